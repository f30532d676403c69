"""Every ramp's output for every text: one release-mode pass with every ramp closed, so each row runs to the end
and each ramp's confidence and label are kept. The recording that tuning, re-tuning and replay start from."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.config import EngineConfig
from pipeline.data.texts import validate_text
from pipeline.engine.policy import ExitPolicy
from pipeline.engine.predictor import Predictor
from pipeline.feedback import CLOSED, FeedbackWindow


def recording_path(cache_dir: str | Path, label: str, fingerprint: str, texts: Sequence[str]) -> Path:
    """Where a recording of exactly `texts` with the artifact of `fingerprint` (pipeline.model.artifact) is
    cached: `<cache_dir>/<label>-<key>.npz`."""
    key = hashlib.sha1((fingerprint + "\x00" + "\x1f".join(texts)).encode("utf-8")).hexdigest()[:16]
    return Path(cache_dir) / f"{label}-{key}.npz"


def record_ramps(
    artifact: Any,
    texts: Sequence[str],
    chunk_rows: int = 1024,
    progress: Callable[[int, int], None] | None = None,
    engine: dict[str, Any] | None = None,
    return_confidence: bool = False,
) -> FeedbackWindow | tuple[FeedbackWindow, np.ndarray]:
    """Every ramp's output for every text, in the caller's order (one release-mode pass, all ramps closed).

    ``artifact``: an early-exit artifact directory, or a ``Predictor`` already loaded (its policy is replaced
    by an all-closed one for the pass). ``engine``: extra ``EngineConfig`` fields (device, dtype, ...).
    With ``return_confidence`` also returns the original model's confidence per row ([N], max softmax of the
    final head): a difficulty measure for building drift streams.
    Texts that cannot be classified (empty, not strings) are refused up front: drop them first.
    """
    texts = list(texts)
    for i, t in enumerate(texts):
        why = validate_text(t)
        if why:
            raise ValueError(f"record_ramps: text {i} cannot be classified ({why}); drop such rows before recording")
    if isinstance(artifact, Predictor):
        pred = artifact
    else:
        pred = Predictor(str(artifact), EngineConfig(**{**(engine or {}), "mode": "release"}))
    R = pred.num_ramps
    saved = pred.policy
    pred.set_policy(ExitPolicy(np.full(R, CLOSED), np.ones(R, bool)))
    parts: list[FeedbackWindow] = []
    scores: list[np.ndarray] = []
    try:
        for start in range(0, len(texts), chunk_rows):
            chunk = texts[start : start + chunk_rows]
            # Keys pick shadow rows in exit mode only; release mode feeds back every row.
            out = pred.predict(chunk, ids=[str(start + k) for k in range(len(chunk))], mode="release")
            fb, rows = out.feedback, np.asarray(out.feedback_rows, np.int64)
            if len(fb) != len(chunk) or not np.array_equal(np.sort(rows), np.arange(len(chunk))):
                bad = [p.error for p in out.predictions if p.error]
                raise RuntimeError(
                    f"record_ramps: {len(fb)} feedback rows for {len(chunk)} texts (errors: {bad[:3]}); every row must"
                    " run to the end in release mode"
                )
            order = np.argsort(rows, kind="stable")  # feedback order -> caller order
            parts.append(fb.take(order))
            # Every ramp closed: each answer comes from the original head, so its score is the model's confidence.
            scores.append(np.array([p.score for p in out.predictions], np.float32))
            if progress:
                progress(min(start + chunk_rows, len(texts)), len(texts))
    finally:
        pred.set_policy(saved)
    window = FeedbackWindow.concat(parts) if parts else FeedbackWindow.empty(R)
    if return_confidence:
        return window, (np.concatenate(scores) if scores else np.zeros(0, np.float32))
    return window
