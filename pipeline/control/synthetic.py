"""Synthetic feedback windows with a controllable ramp quality (tests, benchmarks, replays).

Each row has a difficulty d ~ U(0, 1); ramp r has a skill s_r. The ramp agrees with the original model
with probability p = sigmoid(sharpness * (s_r - d)) and reports a confidence near max(p, 1/C)
(logit-scale noise), so confidence is informative about agreement the way a trained ramp's is.
``shift`` moves every row's difficulty up (drift toward harder inputs).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.feedback import FeedbackWindow

__all__ = ["synthetic_window"]


def synthetic_window(
    rows: int,
    skills: Sequence[float],
    num_classes: int = 2,
    seed: int = 0,
    sharpness: float = 8.0,
    noise: float = 0.5,
    shift: float = 0.0,
) -> FeedbackWindow:
    """A window of ``rows`` rows with one ramp per entry of ``skills`` (higher = more often right)."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be >= 2")
    rng = np.random.default_rng(seed)
    s = np.asarray(skills, dtype=np.float64)[None, :]  # [1, R]
    d = np.clip(rng.uniform(0.0, 1.0, size=(rows, 1)) + shift, 0.0, 1.5)  # [N, 1]
    p = 1.0 / (1.0 + np.exp(-sharpness * (s - d)))  # [N, R] chance the ramp agrees
    right = rng.uniform(size=p.shape) < p
    final = rng.integers(0, num_classes, size=rows)
    wrong_pred = (final[:, None] + rng.integers(1, num_classes, size=p.shape)) % num_classes
    pred = np.where(right, final[:, None], wrong_pred)
    # Noise on the logit scale keeps confidences inside (1/C, 1) with no pile-up at 1.0.
    lo = 1.0 / num_classes
    q = np.clip((p - lo) / (1.0 - lo), 1e-6, 1.0 - 1e-6)
    z = np.log(q / (1.0 - q)) + rng.normal(0.0, noise, size=p.shape)
    conf = lo + (1.0 - lo) / (1.0 + np.exp(-z))
    return FeedbackWindow(conf=conf.astype(np.float32), pred=pred, final=final)
