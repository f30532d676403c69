"""Ramp adjustment under a ramp budget: which ramps should be active at all.

Pure numpy functions. A ramp earns its keep when the rows exiting at it save more than the ramp costs
the rows that pass it without exiting (Apparate section 4.2):

    utility_i = exit_rate_i * (cost saved by exiting at i instead of running to the end)
                - pass_rate_i * ramp_cost_i

in units of the original model's cost per row (so 0.05 = 5% of a full forward pass). Feedback windows
carry every ramp's output, so the value of an inactive ramp can be estimated by tuning with it added.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

from .tuner import evaluate, exit_costs, tune_thresholds

__all__ = [
    "RampBudget",
    "RampDecision",
    "ramp_utilities",
    "tail_overhead",
    "candidate_gains",
    "adjust_ramps",
]


@dataclass(frozen=True)
class RampBudget:
    """Limits on the active ramp set."""

    max_active: int
    """Most ramps active at once (Apparate: 2 for NLP, 3 for CV)."""
    max_tail_overhead: float = 0.05
    """Most extra cost for a row that never exits: sum(active ramp costs) / full model cost."""

    def __post_init__(self) -> None:
        if self.max_active < 0:
            raise ValueError(f"max_active must be >= 0, got {self.max_active}")
        if self.max_tail_overhead < 0:
            raise ValueError(f"max_tail_overhead must be >= 0, got {self.max_tail_overhead}")

    def fits(self, costs: CostModel, active: np.ndarray | Sequence[bool]) -> bool:
        """True when ``active`` respects both limits."""
        a = np.asarray(active, dtype=bool)
        return int(a.sum()) <= self.max_active and tail_overhead(costs, a) <= self.max_tail_overhead + 1e-12


@dataclass(frozen=True)
class RampDecision:
    """Outcome of :func:`adjust_ramps`."""

    active: np.ndarray  # [R] bool, the new active set
    dropped: list[int] = field(default_factory=list)  # ramps turned off
    added: list[int] = field(default_factory=list)  # ramps turned on
    scores: np.ndarray | None = None  # [R] score used to rank ramps under the budget (NaN = not ranked)

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.added)

    def to_dict(self) -> dict[str, Any]:
        return {
            "active": self.active.tolist(),
            "dropped": list(self.dropped),
            "added": list(self.added),
            "scores": None if self.scores is None else [None if np.isnan(x) else float(x) for x in self.scores],
        }


def tail_overhead(costs: CostModel, active: np.ndarray | Sequence[bool]) -> float:
    """Extra cost a never-exiting row pays for the active ramps, as a share of the full model."""
    a = np.asarray(active, dtype=bool)
    return float(costs.ramp_costs[a].sum() / costs.full_cost())


def ramp_utilities(
    window: FeedbackWindow,
    costs: CostModel,
    thresholds: np.ndarray | Sequence[float],
    active: np.ndarray | Sequence[bool],
    if_opened: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """[R] utility of each active ramp on ``window`` at ``thresholds``; NaN for inactive ramps.

    "Cost saved by exiting at i" is the cost of a row that runs to the end minus the cost of exiting at
    i (remaining layers and later active ramps). This is Apparate's definition: it credits ramp i with
    the whole tail even when a later ramp would have caught the row, so it errs toward keeping ramps.

    ``if_opened``: the thresholds the tuner would set now (e.g. tuned on the window). A ramp closed in
    ``thresholds`` only costs, whatever it is worth, so it is judged at these instead: by what it would
    save if opened. One the tuner keeps closed too still shows just its cost. Without it, a controller that
    starts with every ramp closed would find every utility negative and drop them all at its first check.
    """
    if if_opened is not None:
        util = ramp_utilities(window, costs, thresholds, active)
        closed = np.isfinite(util) & (np.asarray(thresholds, dtype=np.float64) >= CLOSED)
        if closed.any():
            util[closed] = ramp_utilities(window, costs, if_opened, active)[closed]
        return util
    act = np.asarray(active, dtype=bool)
    R = act.shape[0]
    util = np.full(R, np.nan)
    N = len(window)
    if N == 0:
        return np.where(act, 0.0, np.nan)
    out = evaluate(window, costs, thresholds, act)
    at_exit, no_exit = exit_costs(costs, act)
    exit_rate = out.exit_counts / N
    # Rows that reach ramp i and go on: never exit, or exit at a later ramp.
    pos = np.where(out.exit_ramp >= 0, out.exit_ramp, R)
    passed = np.array([(pos > i).sum() for i in range(R)]) / N
    value = exit_rate * (no_exit - at_exit) - passed * costs.ramp_costs
    util[act] = value[act] / costs.full_cost()
    return util


def candidate_gains(
    window: FeedbackWindow,
    costs: CostModel,
    active: np.ndarray | Sequence[bool],
    constraint: float = 0.01,
    floor: float | np.ndarray = 0.0,
    **tune_kwargs: Any,
) -> np.ndarray:
    """[R] estimated value of turning on each inactive ramp (NaN for active ramps).

    The value is the marginal savings: tuned savings with the ramp added minus tuned savings of the
    current set, both tuned on ``window`` under ``constraint``. Same unit as :func:`ramp_utilities`
    (share of the full model's cost per row). It nets out rows a later ramp would have caught anyway,
    which utility does not, so it only proposes ramps that raise overall savings.
    """
    act = np.asarray(active, dtype=bool)
    gains = np.full(act.shape[0], np.nan)
    if len(window) == 0:
        return gains
    base = tune_thresholds(window, costs, constraint, act, floor=floor, **tune_kwargs).savings
    for i in np.flatnonzero(~act).tolist():
        trial = act.copy()
        trial[i] = True
        gains[i] = tune_thresholds(window, costs, constraint, trial, floor=floor, **tune_kwargs).savings - base
    return gains


def adjust_ramps(
    utility_history: Sequence[np.ndarray] | np.ndarray,
    active: np.ndarray | Sequence[bool],
    costs: CostModel,
    budget: RampBudget,
    candidate_gain: np.ndarray | Sequence[float] | None = None,
    negative_share: float = 0.6,
    min_history: int = 1,
) -> RampDecision:
    """Choose the next active set from recent per-window utilities.

    1. Drop an active ramp when more than ``negative_share`` of its recent utilities are negative
       (Apparate's NLP rule), judged once it has ``min_history`` finite entries.
    2. Add the inactive ramp with the largest positive ``candidate_gain`` (at most one per call; never a
       ramp dropped in the same call).
    3. Enforce the budget: rank kept ramps by mean utility (the added one by its gain) and keep them in
       that order while both limits hold, so the highest-utility ramps survive.

    ``utility_history``: windows x [R] utilities (NaN where a ramp was inactive), oldest first.
    """
    act = np.asarray(active, dtype=bool).copy()
    R = act.shape[0]
    if costs.num_ramps != R:
        raise ValueError(f"active has {R} entries but the cost model has {costs.num_ramps} ramps")
    H = np.asarray(utility_history, dtype=np.float64).reshape(-1, R) if len(utility_history) else np.zeros((0, R))
    finite = np.isfinite(H)
    seen = finite.sum(axis=0)
    negative = (np.where(finite, H, 0.0) < 0).sum(axis=0)
    share = np.divide(negative, seen, out=np.zeros(R), where=seen > 0)
    mean_util = np.divide(np.where(finite, H, 0.0).sum(axis=0), seen, out=np.zeros(R), where=seen > 0)

    drop = act & (seen >= max(1, min_history)) & (share > negative_share)
    keep = act & ~drop
    scores = np.where(keep, mean_util, np.nan)

    added: list[int] = []
    if candidate_gain is not None:
        g = np.asarray(candidate_gain, dtype=np.float64).reshape(-1)
        if g.shape[0] != R:
            raise ValueError(f"candidate_gain has {g.shape[0]} entries, expected {R}")
        ok = ~act & np.isfinite(g) & (g > 0)
        if ok.any():
            i = int(np.flatnonzero(ok)[np.argmax(g[ok])])  # first index wins ties
            keep[i] = True
            scores[i] = g[i]
            added.append(i)

    # Budget: greedy fill by score (ties -> lower index), skipping ramps that would break a limit.
    order = sorted(np.flatnonzero(keep).tolist(), key=lambda i: (-scores[i], i))
    chosen = np.zeros(R, dtype=bool)
    for i in order:
        trial = chosen.copy()
        trial[i] = True
        if budget.fits(costs, trial):
            chosen = trial
    added = [i for i in added if chosen[i]]
    dropped = np.flatnonzero(act & ~chosen).tolist()
    return RampDecision(active=chosen, dropped=dropped, added=added, scores=scores)
