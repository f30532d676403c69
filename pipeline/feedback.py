"""Feedback records and the cost model: the contract between the engine, which produces them, and the
controller, which tunes on them (so they belong to neither).

The model engine produces a :class:`FeedbackWindow` from rows that ran to the end of the model
(every row in release mode, the shadow rows in exit mode). A window carries every ramp's
confidence and prediction, active or not, so the controller can judge ramps it is not using.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = ["FeedbackWindow", "CostModel", "CLOSED"]

CLOSED = 1.0
"""Threshold of a ramp that never exits (exit needs ``conf >= thr`` and ``thr < 1``)."""


@dataclass
class FeedbackWindow:
    """Per-row ramp outputs of rows that ran to the end of the model.

    Shapes: ``conf`` [N, R] float32 (max softmax of ramp r), ``pred`` [N, R] int64 (argmax of ramp r),
    ``final`` [N] int64 (the deployed model's own final prediction).

    ``reference`` [N] int64, optional: the answers the accuracy budget is measured against when they
    are not the deployed model's own, e.g. the float original's labels for a quantized model. Then a
    row that never exits is right only when ``final == reference``. Default: ``final``.
    """

    conf: np.ndarray
    pred: np.ndarray
    final: np.ndarray
    reference: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.conf = np.asarray(self.conf, dtype=np.float32)
        self.pred = np.asarray(self.pred, dtype=np.int64)
        self.final = np.asarray(self.final, dtype=np.int64).reshape(-1)
        if self.conf.ndim != 2:
            raise ValueError(f"conf must be [rows, ramps], got shape {self.conf.shape}")
        if self.pred.shape != self.conf.shape:
            raise ValueError(f"pred shape {self.pred.shape} must equal conf shape {self.conf.shape}")
        if self.final.shape[0] != self.conf.shape[0]:
            raise ValueError(f"final has {self.final.shape[0]} rows, conf has {self.conf.shape[0]}")
        if self.reference is not None:
            self.reference = np.asarray(self.reference, dtype=np.int64).reshape(-1)
            if self.reference.shape != self.final.shape:
                raise ValueError(f"reference has {self.reference.shape[0]} rows, final has {self.final.shape[0]}")

    @property
    def labels(self) -> np.ndarray:
        """[N] the answers agreement is measured against (``reference``, else ``final``)."""
        return self.final if self.reference is None else self.reference

    @property
    def final_ok(self) -> np.ndarray:
        """[N] bool: a row that runs to the end gives the right answer."""
        return np.ones(len(self), bool) if self.reference is None else self.final == self.reference

    def __len__(self) -> int:
        return int(self.conf.shape[0])

    @property
    def num_ramps(self) -> int:
        return int(self.conf.shape[1])

    @classmethod
    def empty(cls, num_ramps: int) -> "FeedbackWindow":
        """A window with no rows and ``num_ramps`` ramps."""
        return cls(
            conf=np.zeros((0, num_ramps), np.float32),
            pred=np.zeros((0, num_ramps), np.int64),
            final=np.zeros((0,), np.int64),
        )

    @classmethod
    def concat(cls, windows: Sequence["FeedbackWindow"]) -> "FeedbackWindow":
        """Rows of ``windows`` stacked in order; all must have the same number of ramps."""
        if not windows:
            raise ValueError("concat needs at least one window")
        ramps = {w.num_ramps for w in windows}
        if len(ramps) != 1:
            raise ValueError(f"windows disagree on the number of ramps: {sorted(ramps)}")
        with_ref = any(w.reference is not None for w in windows)
        return cls(
            conf=np.concatenate([w.conf for w in windows], axis=0),
            pred=np.concatenate([w.pred for w in windows], axis=0),
            final=np.concatenate([w.final for w in windows], axis=0),
            reference=np.concatenate([w.labels for w in windows]) if with_ref else None,
        )

    def slice(self, start: int, stop: int | None = None) -> "FeedbackWindow":
        """Rows ``start:stop`` as a new window (views, no copy)."""
        ref = None if self.reference is None else self.reference[start:stop]
        return FeedbackWindow(self.conf[start:stop], self.pred[start:stop], self.final[start:stop], ref)

    def take(self, rows: np.ndarray) -> "FeedbackWindow":
        """The rows at ``rows`` (indices or a bool mask), in that order, as a new window."""
        ref = None if self.reference is None else self.reference[rows]
        return FeedbackWindow(self.conf[rows], self.pred[rows], self.final[rows], ref)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists, for JSON and cheap Ray transport."""
        d = {"conf": self.conf.tolist(), "pred": self.pred.tolist(), "final": self.final.tolist()}
        if self.reference is not None:
            d["reference"] = self.reference.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeedbackWindow":
        conf = np.asarray(d["conf"], dtype=np.float32)
        pred = np.asarray(d["pred"], dtype=np.int64)
        if conf.size == 0:  # [] loses the ramp dimension; keep it from whichever side has it
            r = conf.shape[1] if conf.ndim == 2 else (pred.shape[1] if pred.ndim == 2 else 0)
            conf, pred = conf.reshape(0, r), pred.reshape(0, r)
        ref = d.get("reference")
        return cls(conf=conf, pred=pred, final=np.asarray(d["final"], dtype=np.int64),
                   reference=None if ref is None else np.asarray(ref, dtype=np.int64))


@dataclass
class CostModel:
    """Latency (or compute) profile of the model with ramps.

    ``layer_costs`` [L]: cost of each encoder layer (seconds or relative units), L >= 1.
    ``ramp_layers`` [R]: ramp r sits after encoder layer ``ramp_layers[r]`` (1-based), strictly increasing.
    ``ramp_costs`` [R]: cost of evaluating ramp r.
    """

    layer_costs: np.ndarray
    ramp_layers: np.ndarray
    ramp_costs: np.ndarray

    def __post_init__(self) -> None:
        self.layer_costs = np.asarray(self.layer_costs, dtype=np.float64).reshape(-1)
        self.ramp_layers = np.asarray(self.ramp_layers, dtype=np.int64).reshape(-1)
        self.ramp_costs = np.asarray(self.ramp_costs, dtype=np.float64).reshape(-1)
        L = self.layer_costs.shape[0]
        if L < 1:
            raise ValueError("layer_costs needs at least one layer")
        if np.any(self.layer_costs < 0) or np.any(self.ramp_costs < 0):
            raise ValueError("layer_costs and ramp_costs must be >= 0")
        if self.full_cost() <= 0:
            raise ValueError("sum(layer_costs) must be > 0 (savings are relative to it)")
        if self.ramp_costs.shape != self.ramp_layers.shape:
            raise ValueError(
                f"ramp_costs has {self.ramp_costs.shape[0]} entries, ramp_layers {self.ramp_layers.shape[0]}"
            )
        if self.ramp_layers.size and (self.ramp_layers.min() < 1 or self.ramp_layers.max() > L):
            raise ValueError(f"ramp_layers must lie in 1..{L} (1-based), got {self.ramp_layers.tolist()}")
        if np.any(np.diff(self.ramp_layers) <= 0):
            raise ValueError(f"ramp_layers must be strictly increasing, got {self.ramp_layers.tolist()}")

    @property
    def num_layers(self) -> int:
        return int(self.layer_costs.shape[0])

    @property
    def num_ramps(self) -> int:
        return int(self.ramp_layers.shape[0])

    def full_cost(self) -> float:
        """Cost of the original model (all layers, no ramps)."""
        return float(self.layer_costs.sum())

    def prefix_costs(self) -> np.ndarray:
        """[R] cost of the layers up to and including ramp r's layer (ramp costs excluded)."""
        return np.cumsum(self.layer_costs)[self.ramp_layers - 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_costs": self.layer_costs.tolist(),
            "ramp_layers": self.ramp_layers.tolist(),
            "ramp_costs": self.ramp_costs.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CostModel":
        return cls(d["layer_costs"], d["ramp_layers"], d["ramp_costs"])

    @classmethod
    def uniform(cls, num_layers: int, ramp_layers: Sequence[int], ramp_cost: float = 0.01) -> "CostModel":
        """Every layer costs 1; every ramp costs ``ramp_cost`` (a fraction of a layer)."""
        ramp_layers = list(ramp_layers)
        return cls(np.ones(num_layers), ramp_layers, np.full(len(ramp_layers), ramp_cost))
