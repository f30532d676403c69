"""Exit-threshold tuning: evaluate a threshold set on a feedback window, and Apparate's greedy search.

Pure numpy functions (no Ray, no torch) so they are cheap to test and to replay offline.

Exit rule: a row exits at the first active ramp r (in layer order) with ``conf[n, r] >= thr[r]`` and
``thr[r] < 1``. Cost of a row exiting at ramp j = layers up to ramp j's layer + the active ramps up to
and including j; a row that never exits pays every layer and every active ramp. Savings are relative to
the original model (all layers, no ramps), so they can be negative. Agreement counts a row as right when
the exit ramp's prediction equals the window's labels (the final prediction, or a ``reference`` such as
the float original's answers for a quantized model); a row that never exits is right when its final
prediction equals them (always, without a reference).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

__all__ = [
    "Outcome",
    "TuneResult",
    "evaluate",
    "evaluate_stretches",
    "tune_thresholds",
    "static_threshold_search",
    "exit_costs",
]

# Largest threshold below CLOSED: used when the lowest exiting confidence is exactly 1.0, so that
# the rows keep exiting (a threshold of exactly 1.0 means "closed").
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


@dataclass(frozen=True)
class Outcome:
    """Result of running the exit rule over a window."""

    agreement: float  # share of rows whose answer equals the original model's
    savings: float  # 1 - mean(row cost) / full_cost; ramp costs included, can be negative
    layer_savings: float  # 1 - mean(layers run) / L; ramp costs ignored
    exit_counts: np.ndarray  # [R] rows exiting at each ramp
    exit_ramp: np.ndarray  # [N] ramp each row exits at, -1 = ran to the end

    @property
    def rows(self) -> int:
        return int(self.exit_ramp.shape[0])

    @property
    def exit_rate(self) -> float:
        """Share of rows that exit at some ramp."""
        return float(self.exit_counts.sum() / self.rows) if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (per-row exits left out)."""
        return {
            "rows": self.rows,
            "agreement": self.agreement,
            "savings": self.savings,
            "layer_savings": self.layer_savings,
            "exit_counts": self.exit_counts.tolist(),
        }


@dataclass(frozen=True)
class TuneResult:
    """Thresholds chosen by a search, with their outcome on the window they were tuned on."""

    thresholds: np.ndarray  # [R]; inactive ramps are CLOSED
    agreement: float
    savings: float
    layer_savings: float
    exit_counts: np.ndarray  # [R]
    rounds: int  # search rounds (greedy) or grid points evaluated (static)
    moves: int  # threshold moves that changed some row's exit
    restarted: bool  # True when `start` broke the constraint and the search began from all-closed
    elapsed_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "thresholds": self.thresholds.tolist(),
            "agreement": self.agreement,
            "savings": self.savings,
            "layer_savings": self.layer_savings,
            "exit_counts": self.exit_counts.tolist(),
            "rounds": self.rounds,
            "moves": self.moves,
            "restarted": self.restarted,
            "elapsed_ms": self.elapsed_ms,
        }


def _check(window: FeedbackWindow, costs: CostModel) -> int:
    R = window.num_ramps
    if R != costs.num_ramps:
        raise ValueError(f"window has {R} ramps but the cost model has {costs.num_ramps}; they must match")
    return R


def _as_active(active: np.ndarray | Sequence[bool] | None, R: int) -> np.ndarray:
    if active is None:
        return np.ones(R, dtype=bool)
    a = np.asarray(active, dtype=bool).reshape(-1)
    if a.shape[0] != R:
        raise ValueError(f"active has {a.shape[0]} entries, expected one per ramp ({R})")
    return a


def _as_thresholds(thresholds: np.ndarray | Sequence[float], R: int) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape[0] != R:
        raise ValueError(f"thresholds has {t.shape[0]} entries, expected one per ramp ({R})")
    if np.any(np.isnan(t)):
        raise ValueError(f"thresholds contain NaN: {t.tolist()}")
    return t


def exit_costs(costs: CostModel, active: np.ndarray) -> tuple[np.ndarray, float]:
    """Cost of a row exiting at each ramp ([R]) and of a row that never exits, for an active set."""
    ramp_cost = np.where(active, costs.ramp_costs, 0.0)
    at_exit = costs.prefix_costs() + np.cumsum(ramp_cost)
    return at_exit, costs.full_cost() + float(ramp_cost.sum())


def _first_exit(conf: np.ndarray, thr: np.ndarray, active: np.ndarray) -> np.ndarray:
    """[N] first ramp each row exits at, -1 when none. conf [N, R]."""
    can = (conf >= thr[None, :]) & ((thr < CLOSED) & active)[None, :]
    first = can.argmax(axis=1)
    return np.where(can.any(axis=1), first, -1)


def evaluate(
    window: FeedbackWindow,
    costs: CostModel,
    thresholds: np.ndarray | Sequence[float],
    active: np.ndarray | Sequence[bool] | None = None,
) -> Outcome:
    """Run the exit rule over ``window`` and measure agreement and savings (vectorised)."""
    R = _check(window, costs)
    act = _as_active(active, R)
    thr = _as_thresholds(thresholds, R)
    N = len(window)
    exit_ramp = _first_exit(window.conf, thr, act)
    if N == 0:
        return Outcome(1.0, 0.0, 0.0, np.zeros(R, np.int64), exit_ramp.astype(np.int64))
    at_exit, no_exit = exit_costs(costs, act)
    exited = exit_ramp >= 0
    j = np.where(exited, exit_ramp, 0)
    row_cost = np.where(exited, at_exit[j], no_exit)
    rows = np.arange(N)
    agree = np.where(exited, window.pred[rows, j] == window.labels, window.final_ok)
    layers = np.where(exited, costs.ramp_layers[j], costs.num_layers)
    return Outcome(
        agreement=float(agree.mean()),
        savings=float(1.0 - row_cost.mean() / costs.full_cost()),
        layer_savings=float(1.0 - layers.mean() / costs.num_layers),
        exit_counts=np.bincount(exit_ramp[exited], minlength=R).astype(np.int64),
        exit_ramp=exit_ramp.astype(np.int64),
    )


def evaluate_stretches(
    window: FeedbackWindow,
    costs: CostModel,
    stretches: Sequence[tuple[int, np.ndarray | Sequence[float], np.ndarray | Sequence[bool] | None]],
) -> dict[str, float]:
    """Row-weighted agreement, savings, layer_savings and exit_rate of ``window`` as it was served in
    stretches: ``stretches`` = [(stop row, thresholds, active)], each covering the rows from the previous
    stop to its own, under the state in force while they were served."""
    keys = ("agreement", "savings", "layer_savings", "exit_rate")
    n, lo, total = len(window), 0, dict.fromkeys(keys, 0.0)
    for hi, thr, act in stretches:
        hi = min(hi, n)
        if hi > lo:
            out = evaluate(window.slice(lo, hi), costs, thr, act)
            for k in keys:
                total[k] += (hi - lo) * getattr(out, k)
            lo = hi
    return {k: v / max(n, 1) for k, v in total.items()}


def _result(window, costs, thr, act, rounds, moves, restarted, t0) -> TuneResult:
    out = evaluate(window, costs, thr, act)
    return TuneResult(
        thresholds=thr,
        agreement=out.agreement,
        savings=out.savings,
        layer_savings=out.layer_savings,
        exit_counts=out.exit_counts,
        rounds=rounds,
        moves=moves,
        restarted=restarted,
        elapsed_ms=(time.perf_counter() - t0) * 1e3,
    )


def _allowed_wrong(constraint: float, n: int) -> int:
    # Integer budget of disagreeing rows; the epsilon keeps 0.01 * 500 == 5 from rounding down.
    return int(math.floor(constraint * n + 1e-9))


def tune_thresholds(
    window: FeedbackWindow,
    costs: CostModel,
    constraint: float = 0.01,
    active: np.ndarray | Sequence[bool] | None = None,
    init_step: float = 0.01,
    min_step: float = 0.001,
    start: np.ndarray | Sequence[float] | None = None,
    floor: float | np.ndarray | Sequence[float] = 0.0,
    max_rounds: int = 10_000,
    snap: bool = True,
) -> TuneResult:
    """Apparate's greedy threshold search on one feedback window.

    Start with every active ramp closed (or from ``start``; if ``start`` already breaks the constraint on
    this window the search starts from all-closed instead, since it only ever lowers thresholds). Each
    round tries lowering each active ramp's threshold by that ramp's step (clipped at ``floor``, a
    scalar or one value per ramp). Among moves that keep ``1 - agreement <= constraint`` it applies the
    one with the best savings gained per agreement lost: a move that loses no agreement beats any move
    that loses some (then more savings, then the lower ramp index, so the search is deterministic).
    The applied ramp's step doubles; when no move is feasible every step halves; a ramp is done when its
    step is below ``min_step`` or it sits at its floor. Per-ramp steps follow Apparate's artifact.

    Plateaus: a move that changes no row's exit (no row's confidence lies in the band it opens) is
    applied at once and its step doubles, so the search crosses empty stretches of confidence in a few
    rounds; such moves change nothing on the window, so they commute with the round's real move.
    Termination: every applied move lowers a threshold by >= ``min_step`` or to the floor, and
    halvings are bounded by doublings; ``max_rounds`` is a backstop.

    With ``snap`` each threshold is finally raised to the lowest confidence that still exits there (a
    ramp nobody exits at is closed). That changes no exit on this window and keeps thresholds off the
    empty stretches the plateau moves crossed, which is the conservative choice under drift.

    Cost: per round, two binary searches and a gather over the rows in each ramp's band, using
    confidences sorted once per ramp; milliseconds for a dozen ramps and a few thousand rows.
    """
    t0 = time.perf_counter()
    R = _check(window, costs)
    act = _as_active(active, R)
    if not 0.0 <= constraint < 1.0:
        raise ValueError(f"constraint must be in [0, 1), got {constraint}")
    if not 0.0 < min_step <= init_step:
        raise ValueError(f"need 0 < min_step <= init_step, got min_step={min_step}, init_step={init_step}")
    floors = np.clip(np.broadcast_to(np.asarray(floor, dtype=np.float64), (R,)), 0.0, CLOSED).copy()

    thr = np.full(R, CLOSED)
    if start is not None:
        s = _as_thresholds(start, R)
        thr = np.where(act, np.clip(s, floors, CLOSED), CLOSED)
    N = len(window)
    if N == 0:  # nothing to learn from: keep what we were given
        return _result(window, costs, thr, act, 0, 0, False, t0)

    conf, final_ok = window.conf, window.final_ok
    agree = window.pred == window.labels[:, None]  # [N, R] ramp r agrees with the reference answers
    at_exit, no_exit = exit_costs(costs, act)
    allowed = _allowed_wrong(constraint, N)

    def state(t: np.ndarray):
        pos = _first_exit(conf, t, act)
        exited = pos >= 0
        j = np.where(exited, pos, 0)
        cost = np.where(exited, at_exit[j], no_exit)
        ok = np.where(exited, agree[np.arange(N), j], final_ok)
        return np.where(exited, pos, R), cost, ok  # exit position R = ran to the end

    exit_pos, row_cost, row_ok = state(thr)
    wrong = N - int(row_ok.sum())
    restarted = False
    if wrong > allowed and start is not None:
        thr = np.full(R, CLOSED)
        exit_pos, row_cost, row_ok = state(thr)
        wrong, restarted = N - int(row_ok.sum()), True
    # Without a reference all-closed is always feasible. With one it may not be (the final head already
    # disagrees too often); then only moves that keep `wrong` from growing are taken.
    allowed = max(allowed, wrong)

    # Ascending confidences per ramp, as float64 so comparisons with thresholds are exact.
    order = np.argsort(conf, axis=0)  # [N, R]; tie order is irrelevant, bands are sets
    sconf = np.take_along_axis(conf, order, axis=0).astype(np.float64)

    steps = np.full(R, float(init_step))
    live = act & (thr > floors)
    # Per-ramp cache of the last move evaluated: (t, t_new, rows, loss, gain). A move's rows
    # and deltas only change when its own threshold/step changes or an applied move touched rows in
    # its band, so most ramps are not re-evaluated after a round.
    cache: list[tuple | None] = [None] * R
    rounds = moves = 0
    while rounds < max_rounds:
        cand = np.flatnonzero(live & (steps >= min_step))
        if cand.size == 0:
            break
        rounds += 1
        best_key: tuple | None = None
        best = None
        plateau = False
        for i in cand.tolist():
            t = float(thr[i])
            t_new = max(float(floors[i]), round(t - float(steps[i]), 6))
            if t_new >= t:  # step too small to move this threshold
                live[i] = False
                continue
            c = cache[i]
            if c is not None and c[0] == t and c[1] == t_new:
                rows, loss, gain = c[2], c[3], c[4]
            else:
                col = sconf[:, i]
                lo = int(np.searchsorted(col, t_new, side="left"))
                hi = N if t >= CLOSED else int(np.searchsorted(col, t, side="left"))
                band = order[lo:hi, i]
                rows = band[exit_pos[band] > i]  # rows that would now exit at ramp i
                if rows.size == 0:  # plateau: nothing changes, take it and widen the step
                    thr[i] = t_new
                    steps[i] *= 2.0
                    plateau = True
                    if t_new <= floors[i]:
                        live[i] = False
                    continue
                loss = int(row_ok[rows].sum()) - int(agree[rows, i].sum())  # newly wrong rows, can be < 0
                gain = float((row_cost[rows] - at_exit[i]).sum())
                cache[i] = (t, t_new, rows, loss, gain)
            if wrong + loss > allowed:
                continue
            if loss <= 0:
                if gain <= 0.0 and loss == 0:
                    continue  # moves rows for nothing (zero-cost layers)
                key = (1, gain, -loss, -i)
            else:
                if gain <= 0.0:
                    continue
                key = (0, gain / loss, gain, -i)
            if best_key is None or key > best_key:
                best_key, best = key, (i, t_new, rows, loss)
        if best is not None:
            i, t_new, rows, loss = best
            exit_pos[rows] = i
            row_cost[rows] = at_exit[i]
            row_ok[rows] = agree[rows, i]
            wrong += loss
            thr[i] = t_new
            steps[i] *= 2.0
            moves += 1
            if t_new <= floors[i]:
                live[i] = False
            # Drop cached moves whose band holds a row that just changed exit.
            touched = conf[rows].astype(np.float64)  # [k, R]; float64 so the test matches the band's
            for k in range(R):
                c = cache[k]
                if c is not None:
                    hit = touched[:, k] >= c[1]
                    if c[0] < CLOSED:
                        hit &= touched[:, k] < c[0]
                    if hit.any():
                        cache[k] = None
        elif not plateau:
            steps[cand] /= 2.0

    if snap:
        for i in np.flatnonzero(act).tolist():
            exiting = exit_pos == i
            if exiting.any():
                lowest = float(conf[exiting, i].min())
                thr[i] = _BELOW_ONE if lowest >= CLOSED else max(lowest, thr[i])
            else:
                thr[i] = CLOSED
    thr = np.where(act, thr, CLOSED)
    return _result(window, costs, thr, act, rounds, moves, restarted, t0)


def static_threshold_search(
    window: FeedbackWindow,
    costs: CostModel,
    constraint: float = 0.01,
    grid: Sequence[float] | np.ndarray | None = None,
    active: np.ndarray | Sequence[bool] | None = None,
) -> TuneResult:
    """One shared threshold for every active ramp (the DeeBERT / BranchyNet baseline).

    Picks the lowest ``grid`` value whose agreement on ``window`` meets the constraint; when none does,
    every ramp stays closed. Default grid: 0.50, 0.51, ..., 0.99, 0.995, 0.999.
    """
    t0 = time.perf_counter()
    R = _check(window, costs)
    act = _as_active(active, R)
    if grid is None:
        grid = np.concatenate([np.round(np.arange(0.50, 1.0, 0.01), 2), [0.995, 0.999]])
    values = np.unique(np.asarray(grid, dtype=np.float64))  # ascending
    allowed = _allowed_wrong(constraint, len(window))
    tried = 0
    for g in values.tolist():
        tried += 1
        thr = np.where(act, g, CLOSED)
        out = evaluate(window, costs, thr, act)
        wrong = len(window) - int(round(out.agreement * len(window)))
        if wrong <= allowed:
            return _result(window, costs, thr, act, tried, 0, False, t0)
    return _result(window, costs, np.full(R, CLOSED), act, tried, 0, False, t0)
