"""Exit policy: thresholds in, exit mask out. Lives outside the nn.Module so the controller can swap it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.feedback import CLOSED


@dataclass(frozen=True)
class ExitPolicy:
    thresholds: np.ndarray
    """[R] confidence (max softmax) a row needs to exit at ramp r."""
    active: np.ndarray = field(default=None)  # type: ignore[assignment]
    """[R] bool; inactive ramps are not consulted."""
    version: int = 0
    """Controller state version this policy came from (0 = the artifact's own)."""

    def __post_init__(self):
        thr = np.asarray(self.thresholds, dtype=np.float64).reshape(-1)
        if np.isnan(thr).any():
            raise ValueError(f"thresholds {thr.tolist()} contain NaN")
        active = np.ones(len(thr), bool) if self.active is None else np.asarray(self.active, bool).reshape(-1)
        if len(active) != len(thr):
            raise ValueError(f"{len(thr)} thresholds but {len(active)} active flags")
        object.__setattr__(self, "thresholds", thr)
        object.__setattr__(self, "active", active)

    @classmethod
    def closed(cls, num_ramps: int) -> "ExitPolicy":
        return cls(np.full(num_ramps, CLOSED))

    def is_open(self, r: int) -> bool:
        return bool(self.active[r]) and self.thresholds[r] < CLOSED

    def exits(self, r: int, conf: torch.Tensor) -> torch.Tensor:
        """conf [B] -> bool [B]: which rows may exit at ramp r."""
        if not self.is_open(r):
            return torch.zeros_like(conf, dtype=torch.bool)
        return conf >= float(self.thresholds[r])
