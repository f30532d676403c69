"""The controller's versioned state: what workers and replicas fetch, plus counters (JSON via `to_dict`)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Sequence

from pipeline.feedback import CLOSED

__all__ = ["ControllerState", "as_state"]


@dataclass
class ControllerState:
    """The versioned state workers fetch, plus counters. JSON-serialisable via ``to_dict``."""

    version: int
    thresholds: list[float]
    active: list[bool]
    windows: int = 0  # full windows processed
    rows: int = 0  # feedback rows received
    reports: int = 0  # report() calls accepted
    rejected: int = 0  # report() calls refused (malformed payload)
    dropped_rows: int = 0  # rows dropped because the pending buffer was full
    violations: int = 0  # windows whose realized agreement broke the constraint
    backoffs: int = 0  # back-offs applied
    ramp_changes: int = 0  # ramp adjustments that changed the active set
    restores: int = 0  # times this state was restored from a checkpoint
    warm_windows: int = 0  # windows of warm-start rows processed before any live feedback
    updated_at: float = 0.0  # time.time() of the last version change
    calibrated: bool = False  # holding certified thresholds (``calibrate``): backs off, never tunes below them
    feedback_fraction: float = 0.0  # share of rows workers should also run to the end (TuningConfig.feedback_*)

    @classmethod
    def initial(cls, num_ramps: int, active: Sequence[bool] | None = None) -> "ControllerState":
        """All ramps closed; all active unless ``active`` says otherwise."""
        act = [True] * num_ramps if active is None else [bool(a) for a in active]
        return cls(version=0, thresholds=[CLOSED] * num_ramps, active=act, updated_at=time.time())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerState":
        known = {f.name for f in fields(cls)}
        s = cls(**{k: v for k, v in d.items() if k in known})
        s.thresholds = [float(x) for x in s.thresholds]
        s.active = [bool(x) for x in s.active]
        return s


def as_state(x: ControllerState | dict[str, Any] | None) -> ControllerState | None:
    """A private copy (callers' objects are never mutated)."""
    if x is None:
        return None
    return ControllerState.from_dict(x.to_dict() if isinstance(x, ControllerState) else x)
