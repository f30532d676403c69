"""Accuracy guard: watch realized agreement per window and decide when to re-tune or back off.

A small state machine plus pure helpers (no Ray). Apparate re-tunes at once on a violation and, after
repeated violations, cuts the violating ramps before re-tuning (x0.1 for NLP). Our thresholds are on
confidence, so the equivalent cut shrinks the distance to 1.0: ``thr = 1 - (1 - thr) * factor``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np

from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

from .tuner import evaluate

__all__ = ["GuardAction", "AccuracyGuard", "is_violation", "violating_ramps", "back_off"]


class GuardAction(str, Enum):
    """What the controller should do after a window."""

    OK = "ok"  # within the constraint
    RETUNE = "retune"  # a violation: re-tune now on the newest data
    BACKOFF = "backoff"  # repeated violations: raise the violating ramps' thresholds, then re-tune


def is_violation(agreement: float, constraint: float) -> bool:
    """True when ``1 - agreement`` exceeds the constraint (with float slack)."""
    return (1.0 - agreement) > constraint + 1e-12


@dataclass
class AccuracyGuard:
    """Counts consecutive violating windows; ``observe`` returns the action for each new window."""

    constraint: float = 0.01
    """Largest allowed 1 - agreement per window."""
    backoff_after: int = 1
    """Consecutive violations that trigger a back-off (Apparate: 2; the controller's default: 1)."""
    consecutive: int = 0
    """Violations in a row so far."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.constraint < 1.0:
            raise ValueError(f"constraint must be in [0, 1), got {self.constraint}")
        if self.backoff_after < 1:
            raise ValueError(f"backoff_after must be >= 1, got {self.backoff_after}")

    def observe(self, agreement: float) -> GuardAction:
        """Record one window's realized agreement and return the action."""
        if not is_violation(agreement, self.constraint):
            self.consecutive = 0
            return GuardAction.OK
        self.consecutive += 1
        return GuardAction.BACKOFF if self.consecutive >= self.backoff_after else GuardAction.RETUNE

    def record(self, violated: bool) -> GuardAction:
        """Like ``observe``, for a window already judged (e.g. by a binomial test)."""
        return self.observe(0.0 if violated else 1.0)

    def reset(self) -> None:
        self.consecutive = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AccuracyGuard":
        return cls(**d)


def violating_ramps(
    window: FeedbackWindow,
    costs: CostModel,
    thresholds: np.ndarray | Sequence[float],
    active: np.ndarray | Sequence[bool] | None,
    constraint: float,
) -> np.ndarray:
    """[R] bool: ramps whose own exits on ``window`` disagree with the original model too often.

    A ramp violates when wrong exits / exits at that ramp > ``constraint``. Without a reference, whenever
    the window as a whole violates, at least one ramp does (the overall rate is a weighted mean of per-ramp
    rates and non-exiting rows, which are never wrong), so a back-off always has a target. With one (a
    compressed model's head can disagree with the float original) the head alone may break the budget; no
    ramp is to blame then, and the certificate says so.
    """
    out = evaluate(window, costs, thresholds, active)
    R = window.num_ramps
    exited = out.exit_ramp >= 0
    j = out.exit_ramp[exited]
    wrong = window.pred[np.flatnonzero(exited), j] != window.labels[exited]
    wrong_counts = np.bincount(j[wrong], minlength=R)
    rate = np.divide(wrong_counts, out.exit_counts, out=np.zeros(R), where=out.exit_counts > 0)
    return rate > constraint


def back_off(
    thresholds: np.ndarray | Sequence[float],
    ramps: np.ndarray | Sequence[bool],
    factor: float = 0.1,
    close: bool = False,
) -> np.ndarray:
    """Raise the thresholds of ``ramps`` toward 1.0: ``1 - (1 - thr) * factor``, or close them.

    ``factor=0.1`` is the confidence-threshold form of Apparate's x0.1 cut (0.9 -> 0.99 -> 0.999).
    Other ramps are unchanged; already-closed ramps stay closed.
    """
    if not 0.0 <= factor < 1.0:
        raise ValueError(f"factor must be in [0, 1), got {factor}")
    thr = np.asarray(thresholds, dtype=np.float64).copy()
    mask = np.asarray(ramps, dtype=bool)
    if close:
        thr[mask] = CLOSED
    else:
        thr[mask] = np.minimum(CLOSED, 1.0 - (1.0 - np.minimum(thr[mask], CLOSED)) * factor)
    return thr
