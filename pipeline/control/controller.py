"""The threshold controller: one named Ray actor per deployment/job, and the client workers use.

``ThresholdController`` is a plain class (testable without Ray). It gathers feedback rows into windows
of ``window_rows``; for each full window it

1. measures realized agreement under the thresholds in force and asks the accuracy guard what to do;
2. after ``backoff_after`` violating windows in a row (default: the first), backs off the violating
   ramps (their thresholds become tuning floors until the guard has seen ``backoff_hold_windows`` good
   windows);
3. every ``ramp_check_windows`` windows (or at once when the active set breaks the ramp budget) runs
   ramp adjustment (a ramp that was served closed is judged by what it saves at the re-tuned thresholds,
   not by its cost alone: a controller starting all closed would otherwise drop every ramp at once);
4. re-tunes the thresholds from scratch (all ramps closed) on the last ``tune_windows`` windows and,
   no ramp below that, on the newest ``recent_windows``; bumps the version
   when thresholds or the active set change, checkpoints its state (fsspec URL; with the tuning windows and
   ramp utilities, so a restart does not change what it tunes on) and logs a history row.

Why re-tune from scratch rather than from the current thresholds: the greedy search only ever lowers
thresholds, so starting from the current ones would ratchet them down window after window and could
never raise them when inputs get harder. From scratch, thresholds are a function of recent data only
and move both ways; it costs milliseconds.

Why tune on several windows under ``constraint * tune_headroom``: the greedy search fits each ramp's
threshold to the rows it sees, so its agreement on fresh rows is worse than on the tuning rows
(measured on synthetic ramps, 1% budget: 2.0% real disagreement when tuned on 512 rows, 1.4% on 2,048,
1.1% on 8,192). A stationary stream tuned on 4 windows with the full budget broke the constraint in
~35% of 512-row windows; on 8 windows at half the budget in ~12% (about the Poisson noise of judging
512 rows at 0.65% true disagreement) with the same savings, since overfit moves do not save on fresh
rows either. On the real MiniLM movie-review ramps (``offramp replay``, 20 orders of the test split)
half the budget still broke 19/60 windows; 0.3 of it with a back-off on the first violation broke 9/60
at 36.2% savings (vs 41.5%): those are the defaults. The guard judges each window against the full
constraint. A violating window joins the buffer and the re-tune follows at once; shrinking the buffer
to the newest window on a violation was tried and made things worse (more overfitting, more
violations). A violation also backs off (``backoff_after=1``; Apparate waits for a second one): the
violating ramps' cut thresholds become floors for the tuner until ``backoff_hold_windows`` good
windows pass.

Why also tune on the newest ``recent_windows`` windows alone: a buffer that straddles a change of
inputs averages the new rows' disagreement with the old rows' (measured under drift to hard reviews:
windows served at ~1% disagreement while the 8-window buffer tuned to 0.3%). Each ramp gets the higher
of the two tunes' thresholds. When inputs are stationary the short tune overfits toward lower
thresholds, so the buffer's mostly stand (MiniLM replay: 35.8% savings instead of 36.4%, the same 2/60
violating windows); after a drift the newest rows hold the line at once (violating windows after the
first drifted one: 9/100 -> 4/100).

Why an early guard within a window: the first window after a change of inputs is served with
thresholds tuned before it, and the window-end guard only learns of it when the window is over. On every
report once a quarter window is in, the controller checks the rows so far: their disagreement as served,
plus the rest of the window forecast at the current thresholds' rate on those rows, shrunk toward the
tuner's target as if ``early_guard_prior_rows`` rows at that target had come first (two disagreements in
the first 128 rows are a signal, one is noise; three in 256). When the forecast breaks the window's budget it backs off
every open ramp (a few rows cannot say which ramps will err next) and re-tunes at once; again later in
the window if newer rows break it again. Its floors lift after ``early_hold_windows`` good window, so a
false alarm costs little. The window-end guard judges each stretch of rows at the thresholds then in
force. MiniLM replay, state refreshed every 128 rows, 100 stream orders, 3 active ramps at most:
violating windows after the drift 62/600 -> 17/600, in-domain 5/300 -> 0/300, at 43% of the oracle's
savings instead of 45% (the old rule, the rest forecast at the target rate once per window and only the
violating ramps backed off, fired when the budget was already spent).

Warm start: a fresh controller (no checkpoint to restore) given ``warm_start`` rows — an artifact's
``validation_feedback.safetensors``, every ramp's output on the bootstrap validation split — processes
whole windows of them like live feedback before any live row arrives, so its first live
re-tunes see ~1k more rows than a single 512-row window (the first windows are where a cold controller
overfits most). On the MiniLM replay: 2/60 violating windows instead of 9/60, at the same savings.
A warm window never backs off: none of its rows was served, and a back-off holds for windows (the MiniLM
int8 artifact's second warm window missed its 0.53% budget by one row, and two ramps stayed nearly closed
for most of a 50k-row job; int8 replay on the job's corpus, 512-row windows: 28.2% -> 30.3% latency saved).
Warm windows are counted in ``warm_windows``, not ``windows``, and marked ``warm`` in the history.

Why no cap on active ramps by default (``max_active=None``; the tail budget still holds): the cap was
there because every active ramp is another threshold fitted to the same rows, and before the early
guard above the cap bought safety (12 synthetic ramps: 32% of windows broke the constraint all active,
16% capped at 3). With it, more ramps save more for a little more risk under drift. MiniLM replay
(5 ramps, 100 orders): capped at 3, 0/300 violating in-domain at 43% of the oracle's savings and 17/600
after the drift; uncapped, 0/300 at 46% and 30/600. Synthetic 11 ramps: 0/110 either way, 8.8% savings
capped at 3 vs 11.5% uncapped.

``get_or_create_controller`` starts (or finds) the detached actor; ``ControllerClient`` is what
workers and replicas hold: fire-and-forget reports, periodic state fetches with a short timeout, and
the last good state kept whenever the controller is unreachable.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, fields, replace

from pipeline.config import ControllerConfig
from typing import Any, Sequence

import numpy as np

from .guard import AccuracyGuard, GuardAction, back_off, violating_ramps
from .ramp_adjust import RampBudget, adjust_ramps, candidate_gains, ramp_utilities
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow
from .stats import binom_sf, wilson
from .tuner import TuneResult, evaluate, evaluate_stretches, tune_thresholds

__all__ = [
    "DEFAULT_NAMESPACE",
    "ControllerState",
    "ThresholdController",
    "ControllerClient",
    "get_or_create_controller",
]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACE = "offramp"
_CHECKPOINT_FORMAT = 1


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
    feedback_fraction: float = 0.0  # share of rows workers should also run to the end (ControllerConfig.feedback_*)

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


def _as_state(x: ControllerState | dict[str, Any] | None) -> ControllerState | None:
    """A private copy (callers' objects are never mutated)."""
    if x is None:
        return None
    return ControllerState.from_dict(x.to_dict() if isinstance(x, ControllerState) else x)


class ThresholdController:
    """Controller logic: windows of feedback in, versioned thresholds and active ramps out.

    Args:
        costs: latency/compute profile (``CostModel`` or its ``to_dict()``).
        config: ``ControllerConfig`` or a dict of its fields.
        initial_state: starting thresholds/active set (e.g. from bootstrap); default all closed, all
            active. Ignored when a checkpoint exists at ``checkpoint_url``.
        checkpoint_url: fsspec URL of a JSON checkpoint written after every window and read here.
        warm_start: feedback rows to process before any live feedback when there is no checkpoint to
            restore, e.g. the artifact's validation feedback (``FeedbackWindow`` or its dict form); whole
            windows of it only (all of it, as one short window, when it holds less than one window).
    """

    def __init__(
        self,
        costs: CostModel | dict[str, Any],
        config: ControllerConfig | dict[str, Any] | None = None,
        initial_state: ControllerState | dict[str, Any] | None = None,
        checkpoint_url: str | None = None,
        warm_start: FeedbackWindow | dict[str, Any] | None = None,
    ) -> None:
        self.costs = costs if isinstance(costs, CostModel) else CostModel.from_dict(costs)
        config = config if isinstance(config, ControllerConfig) else ControllerConfig.model_validate(config or {})
        self.config = config.resolved()
        self.checkpoint_url = checkpoint_url
        R = self.costs.num_ramps
        cfg = self.config
        self._budget = RampBudget(R if cfg.max_active is None else cfg.max_active, cfg.max_tail_overhead)
        self._guard = AccuracyGuard(cfg.constraint, cfg.backoff_after)
        self._floors = np.zeros(R)
        self._ok_streak = 0
        self._hold = cfg.backoff_hold_windows  # good windows in a row that lift the floors
        self._since_check = 0
        self._pending: deque[FeedbackWindow] = deque()
        self._pending_rows = 0
        self._tune_buf: deque[FeedbackWindow] = deque(maxlen=cfg.tune_windows)
        self._utils: deque[np.ndarray] = deque(maxlen=cfg.utility_windows)
        self._history: deque[dict[str, Any]] = deque(maxlen=cfg.history_limit)
        # Early back-offs in this window: (rows before it, thresholds served until then). They keep the
        # active set; only a window end changes it (and clears this list).
        self._brakes: list[tuple[int, np.ndarray]] = []
        self._logged = 0  # history rows written so far (their "seq")
        self.checkpoint_errors = 0
        self._base: np.ndarray | None = None  # certified thresholds held after calibrate()
        self._pending_output = 0  # answered rows the pending feedback was drawn from
        self._since_change = [0, 0]  # [disagreements, rows] served at the current thresholds

        state = _as_state(initial_state) or ControllerState.initial(R)
        if len(state.thresholds) != R or len(state.active) != R:
            raise ValueError(
                f"initial_state has {len(state.thresholds)} thresholds / {len(state.active)} active flags;"
                f" the cost model has {R} ramps"
            )
        state.thresholds = [CLOSED if not a else float(t) for t, a in zip(state.thresholds, state.active)]
        state.feedback_fraction = self.config.feedback_max
        self.state = state
        if checkpoint_url and self._restore():
            self.state.restores += 1
            self._save()
        elif warm_start is not None:
            self._warm_start(warm_start)

    # ----- public API (also the actor's methods) -----
    def report(self, window: FeedbackWindow | dict[str, Any], output_rows: int = 0) -> int:
        """Add feedback rows, drawn from ``output_rows`` answered rows (a dict window may carry it as
        "output_rows"); process every full window. Returns the current version. Never raises."""
        try:
            if isinstance(window, dict) and "output_rows" in window:
                window = dict(window)
                output_rows = int(window.pop("output_rows"))
            w = self._as_window(window, "window")
        except Exception as exc:  # a bad payload must not take the controller down
            self.state.rejected += 1
            logger.warning("controller rejected a report: %s", exc)
            return self.state.version
        self.state.reports += 1
        self.state.rows += len(w)
        if len(w):
            self._pending.append(w)
            self._pending_rows += len(w)
        self._trim_pending()
        cfg = self.config
        self._pending_output += max(0, output_rows)
        while self._pending_rows >= cfg.window_rows:
            share = cfg.window_rows / self._pending_rows
            self._pending_output -= int(round(self._pending_output * share))
            self._process(self._take(cfg.window_rows))
        if cfg.window_output_rows and self._pending_rows and self._pending_output >= cfg.window_output_rows:
            self.flush()
        if (cfg.early_guard and self._base is None and len(w)
                and self._pending_rows >= max(1, cfg.window_rows // 4)):
            self._early_check()
        return self.state.version

    def flush(self) -> dict[str, Any]:
        """Process the pending rows now as a (short) window, e.g. at the end of a job."""
        self._pending_output = 0
        if self._pending_rows:
            self._process(self._take(self._pending_rows))
        return self.get_state()

    def calibrate(self, thresholds: Sequence[float], evidence: dict[str, Any] | None = None) -> dict[str, Any]:
        """Hold ``thresholds`` (certified on the job's own rows, pipeline.control.calibration) from now on:
        each window is judged by the guard and the ramps that err are backed off, but nothing is ever tuned
        below them (live windows are far smaller than the calibration sample). Returns the new state."""
        thr = np.asarray(thresholds, dtype=np.float64)
        if thr.shape != (self.costs.num_ramps,):
            raise ValueError(f"calibrate: {thr.shape[0]} thresholds for {self.costs.num_ramps} ramps")
        self._base = np.where(self.state.active, thr, CLOSED)
        self._floors = np.zeros(self.costs.num_ramps)
        self._ok_streak, self._brakes = 0, []
        self.state.calibrated = True
        self._set(self._base, np.asarray(self.state.active, bool))
        self._logged += 1
        self._history.append({"seq": self._logged, "window": self.state.windows, "action": "calibrated",
                              "version": self.state.version, "thresholds": list(self.state.thresholds),
                              "evidence": evidence or {}})
        self._save()
        return self.get_state()

    def get_state(self) -> dict[str, Any]:
        """The current versioned state as a plain dict."""
        return self.state.to_dict()

    def history(self, last: int | None = None) -> list[dict[str, Any]]:
        """Per-window records, oldest first (the last ``last`` ones when given); ``seq`` numbers them, and
        an early back-off within a window has a row of its own (action ``early_backoff``)."""
        rows = list(self._history)
        return rows if last is None else rows[-last:]

    def get_config(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(), "costs": self.costs.to_dict(), "checkpoint_url": self.checkpoint_url}

    def ping(self) -> bool:
        return True

    # ----- window processing -----
    def _trim_pending(self) -> None:
        while self._pending_rows > self.config.max_pending_rows and self._pending:
            old = self._pending.popleft()
            self._pending_rows -= len(old)
            self.state.dropped_rows += len(old)
            self._brakes = []  # the rows they were counted on are gone

    def _take(self, n: int) -> FeedbackWindow:
        parts: list[FeedbackWindow] = []
        need = n
        while need > 0:
            w = self._pending.popleft()
            if len(w) > need:
                parts.append(w.slice(0, need))
                self._pending.appendleft(w.slice(need))
                need = 0
            else:
                parts.append(w)
                need -= len(w)
        self._pending_rows -= n
        return parts[0] if len(parts) == 1 else FeedbackWindow.concat(parts)

    def _as_window(self, window: FeedbackWindow | dict[str, Any], what: str) -> FeedbackWindow:
        w = window if isinstance(window, FeedbackWindow) else FeedbackWindow.from_dict(window)
        if w.num_ramps != self.costs.num_ramps:
            raise ValueError(f"{what} has {w.num_ramps} ramps, the cost model {self.costs.num_ramps}")
        return w

    def _warm_start(self, window: FeedbackWindow | dict[str, Any]) -> None:
        w = self._as_window(window, "warm_start")
        # Whole windows only: a short remainder would take one of the tuner's `tune_windows` slots for a few rows.
        n = self.config.window_rows
        full = len(w) // n * n
        for start in range(0, full, n):
            self._process(w.slice(start, start + n), warm=True)
        if full == 0 and len(w):
            self._process(w, warm=True)

    def _violates(self, agreement: float, rows: int) -> bool:
        """The guard's test on ``rows`` served rows at ``agreement`` (ControllerConfig.guard_alpha)."""
        cfg = self.config
        if cfg.guard_alpha is not None:
            wrong = int(round((1.0 - agreement) * rows))
            return binom_sf(wrong, rows, cfg.constraint) < cfg.guard_alpha
        if rows < cfg.window_rows:
            # A short window (the rows left at a job's end) is judged against a whole window's budget: one
            # disagreement in 16 rows would otherwise count as a 6% violation and back ramps off for windows.
            agreement = 1.0 - (1.0 - agreement) * rows / cfg.window_rows
        return (1.0 - agreement) > cfg.constraint + 1e-12

    def _count_served(self, agreement: float, rows: int) -> None:
        """Add a window to the evidence at the current thresholds; set the feedback share it calls for."""
        cfg = self.config
        self._since_change[0] += int(round((1.0 - agreement) * rows))
        self._since_change[1] += rows
        if cfg.feedback_max > 0:
            upper = wilson(*self._since_change)[1]
            self.state.feedback_fraction = cfg.feedback_max if upper > cfg.constraint else cfg.feedback_min

    def _hold_window(self, w: FeedbackWindow, t0: float) -> None:
        """A window while holding certified thresholds: judge it, back off the ramps that erred on a
        violation, lift the back-off after ``backoff_hold_windows`` good windows."""
        cfg, st = self.config, self.state
        thr = np.asarray(st.thresholds, dtype=np.float64)
        act = np.asarray(st.active, dtype=bool)
        realized = self._served(w, thr, act)
        backed_off: list[int] = []
        if self._violates(realized["agreement"], len(w)):
            st.violations += 1
            self._ok_streak = 0
            backed_off = self._back_off(violating_ramps(w, self.costs, thr, act, cfg.constraint), thr)
            self._hold = cfg.backoff_hold_windows
            action = "backoff"
        else:
            self._ok_streak += 1
            if self._ok_streak >= self._hold:
                self._floors[:] = 0.0
            action = "ok"
        self._count_served(realized["agreement"], len(w))
        self._set(np.maximum(self._base, self._floors), act)
        st.windows += 1
        self._log(t0, 0.0, w, action, realized, None, 0, backed_off, None, False)

    def _process(self, w: FeedbackWindow, warm: bool = False) -> None:
        t0 = time.perf_counter()
        if self._base is not None:
            return self._hold_window(w, t0)
        cfg, st = self.config, self.state
        thr = np.asarray(st.thresholds, dtype=np.float64)
        act = np.asarray(st.active, dtype=bool)

        realized = self._served(w, thr, act)
        self._brakes = []
        # Warm rows were never served: they tune, but a miss on them is not a violation to back off from
        # (a back-off holds for windows: a short job would serve most of its rows backed off).
        action = GuardAction.OK if warm else self._guard.record(self._violates(realized["agreement"], len(w)))
        if not warm:
            self._count_served(realized["agreement"], len(w))
        backed_off: list[int] = []
        self._tune_buf.append(w)
        if action is GuardAction.OK:
            self._ok_streak += 1
            if self._ok_streak >= self._hold:
                self._floors[:] = 0.0
        else:
            st.violations += 1
            self._ok_streak = 0
            if action is GuardAction.BACKOFF:
                backed_off = self._back_off(violating_ramps(w, self.costs, thr, act, cfg.constraint), thr)
                self._hold = cfg.backoff_hold_windows

        windows = list(self._tune_buf)
        data = FeedbackWindow.concat(windows)
        target, tune_kw = self._tune_args()
        t_tune = time.perf_counter()
        tuned = self._tune(windows, data, act)
        tune_ms = (time.perf_counter() - t_tune) * 1e3
        # Ramps served closed are judged by what they would save at the thresholds just tuned.
        self._utils.append(ramp_utilities(w, self.costs, thr, act, if_opened=tuned.thresholds))

        self._since_check += 1
        ramp_note: dict[str, Any] | None = None
        new_act = act
        over_budget = not self._budget.fits(self.costs, act)
        if cfg.adjust_ramps and (self._since_check >= cfg.ramp_check_windows or over_budget):
            self._since_check = 0
            gains = candidate_gains(data, self.costs, act, target, **tune_kw)
            decision = adjust_ramps(list(self._utils), act, self.costs, self._budget, gains, cfg.negative_share)
            ramp_note = decision.to_dict()
            if decision.changed:
                new_act = decision.active
                self._utils.clear()  # utilities depend on the whole set: gather fresh evidence
                st.ramp_changes += 1
                t_tune = time.perf_counter()
                tuned = self._tune(windows, data, new_act)
                tune_ms += (time.perf_counter() - t_tune) * 1e3

        self._set(tuned.thresholds, new_act)
        if warm:
            st.warm_windows += 1
        else:
            st.windows += 1
        self._log(t0, tune_ms, w, action.value, realized, tuned, len(data), backed_off, ramp_note, warm)

    def _early_check(self) -> None:
        """Within a window: when the rows so far plus the rest, forecast at the current thresholds' rate on
        the rows so far (shrunk toward the tuner's target by ``early_guard_prior_rows``), would break the
        window's budget, back off every open ramp and re-tune at once (again later in the window when the
        newer rows break the forecast again), instead of serving the rest of the window with thresholds
        known to be too low."""
        cfg, st = self.config, self.state
        t0 = time.perf_counter()
        part = FeedbackWindow.concat(list(self._pending))
        n = len(part)
        thr = np.asarray(st.thresholds, dtype=np.float64)
        act = np.asarray(st.active, dtype=bool)
        served = self._served(part, thr, act)
        # The current thresholds on every row so far: the rows as served, unless a brake came first.
        now = evaluate(part, self.costs, thr, act).agreement if self._brakes else served["agreement"]
        target, prior = cfg.constraint * cfg.tune_headroom, cfg.early_guard_prior_rows
        rate = ((1.0 - now) * n + prior * target) / (n + prior) if prior else target
        if (1.0 - served["agreement"]) * n + (cfg.window_rows - n) * rate <= cfg.constraint * cfg.window_rows + 1e-9:
            return
        self._brakes.append((n, thr))
        self._ok_streak = 0
        held = bool(self._floors.any())
        # Every open ramp: the rows that broke the forecast are too few to say which ramps will err next.
        backed_off = self._back_off(act & (thr < CLOSED), thr)
        self._hold = max(self._hold, cfg.early_hold_windows) if held else cfg.early_hold_windows
        windows = list(self._tune_buf) + [part]
        data = FeedbackWindow.concat(windows)
        t_tune = time.perf_counter()
        tuned = self._tune(windows, data, act)
        tune_ms = (time.perf_counter() - t_tune) * 1e3
        self._set(tuned.thresholds, act)
        self._log(t0, tune_ms, part, "early_backoff", served, tuned, len(data), backed_off, None, False)

    def _served(self, w: FeedbackWindow, thr: np.ndarray, act: np.ndarray) -> dict[str, float]:
        """Agreement and savings of ``w`` as served: the rows before each early back-off in this window
        under the thresholds in force then, the rest under ``thr``; all under ``act``."""
        return evaluate_stretches(w, self.costs, [(b, t, act) for b, t in self._brakes] + [(len(w), thr, act)])

    def _back_off(self, bad: np.ndarray, thr: np.ndarray) -> list[int]:
        """Cut the ramps ``bad`` [R] bool (their cut thresholds become tuning floors); their indices."""
        cfg = self.config
        cut = back_off(thr, bad, cfg.backoff_factor)
        self._floors = np.where(bad, np.maximum(self._floors, cut), self._floors)
        self.state.backoffs += 1
        return np.flatnonzero(bad).tolist()

    def _tune_args(self) -> tuple[float, dict[str, Any]]:
        cfg = self.config
        return cfg.constraint * cfg.tune_headroom, dict(init_step=cfg.init_step, min_step=cfg.min_step, floor=self._floors)

    def _tune(self, windows: list[FeedbackWindow], data: FeedbackWindow, act: np.ndarray) -> TuneResult:
        """Tune on all ``windows`` (``data``: their rows); with ``recent_windows``, raise each ramp's
        threshold to at least what the newest windows alone allow. Stationary inputs: the short tune overfits
        toward lower thresholds, so the buffer's mostly stand. Changed inputs: the newest rows hold the line."""
        target, tune_kw = self._tune_args()
        tuned = tune_thresholds(data, self.costs, target, act, **tune_kw)
        k = self.config.recent_windows
        if 0 < k < len(windows):
            recent = FeedbackWindow.concat(windows[-k:])
            thr = np.maximum(tuned.thresholds, tune_thresholds(recent, self.costs, target, act, **tune_kw).thresholds)
            if not np.array_equal(thr, tuned.thresholds):
                out = evaluate(data, self.costs, thr, act)
                tuned = replace(tuned, thresholds=thr, agreement=out.agreement, savings=out.savings,
                                layer_savings=out.layer_savings, exit_counts=out.exit_counts)
        return tuned

    def _set(self, thresholds: np.ndarray, active: np.ndarray) -> None:
        """Make ``thresholds`` / ``active`` the state; a new version when either changed."""
        st = self.state
        if np.array_equal(thresholds, st.thresholds) and np.array_equal(active, st.active):
            return
        self._since_change = [0, 0]
        if self.config.feedback_max > 0:
            st.feedback_fraction = self.config.feedback_max  # new thresholds: no evidence yet
        st.version += 1
        st.thresholds = [float(x) for x in thresholds]
        st.active = [bool(x) for x in active]
        st.updated_at = time.time()

    def _log(self, t0: float, tune_ms: float, w: FeedbackWindow, action: str, realized: dict[str, float],
             tuned: TuneResult | None, tuned_rows: int, backed_off: list[int], ramp_note: dict[str, Any] | None,
             warm: bool) -> None:
        st = self.state
        self._logged += 1
        self._history.append(
            {
                "seq": self._logged,
                "window": st.windows,
                "warm": warm,
                "rows": len(w),
                "action": action,
                "agreement": realized["agreement"],
                "savings": realized["savings"],
                "layer_savings": realized["layer_savings"],
                "tuned_rows": tuned_rows,
                "tuned_agreement": None if tuned is None else tuned.agreement,
                "tuned_savings": None if tuned is None else tuned.savings,
                "backed_off": backed_off,
                "ramp_check": ramp_note,
                "version": st.version,
                "thresholds": list(st.thresholds),
                "active": list(st.active),
                "tune_ms": tune_ms,
                "window_ms": (time.perf_counter() - t0) * 1e3,
            }
        )
        self._save()

    # ----- checkpoint -----
    def _checkpoint_payload(self) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "num_ramps": self.costs.num_ramps,
            "state": self.state.to_dict(),
            "guard": self._guard.to_dict(),
            "floors": self._floors.tolist(),
            "ok_streak": self._ok_streak,
            "hold": self._hold,
            "since_check": self._since_check,
            # What the next windows are tuned and judged with: without them a restarted controller would
            # tune on its first new window alone.
            "tune_windows": [w.to_dict() for w in self._tune_buf],
            "utilities": [[None if np.isnan(x) else x for x in u.tolist()] for u in self._utils],  # NaN: inactive
            "base": None if self._base is None else self._base.tolist(),
            "since_change": list(self._since_change),
        }

    def _save(self) -> None:
        if not self.checkpoint_url:
            return
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.checkpoint_url)
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            if parent:
                try:
                    fs.makedirs(parent, exist_ok=True)
                except Exception:  # object stores have no directories
                    pass
            text = json.dumps(self._checkpoint_payload())
            tmp = f"{path}.tmp"
            with fs.open(tmp, "w") as f:  # write then rename: a crash never leaves half a checkpoint
                f.write(text)
            fs.mv(tmp, path)
        except Exception as exc:  # never let storage trouble stop tuning
            self.checkpoint_errors += 1
            logger.warning("controller checkpoint to %s failed: %s", self.checkpoint_url, exc)

    def _restore(self) -> bool:
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.checkpoint_url)
            if not fs.exists(path):
                return False
            with fs.open(path, "r") as f:
                payload = json.loads(f.read())
            if payload.get("format") != _CHECKPOINT_FORMAT or payload.get("num_ramps") != self.costs.num_ramps:
                logger.warning("ignoring checkpoint %s: format/ramp count does not match", self.checkpoint_url)
                return False
            # Parse everything before changing anything: a bad checkpoint leaves a fresh controller, not half of one.
            R = self.costs.num_ramps
            state = ControllerState.from_dict(payload["state"])
            floors = np.asarray(payload["floors"], dtype=np.float64)
            windows = [FeedbackWindow.from_dict(w) for w in payload.get("tune_windows", [])]
            utils = [np.asarray(u, dtype=np.float64) for u in payload.get("utilities", [])]
            if floors.shape != (R,) or any(w.num_ramps != R for w in windows) or any(u.shape != (R,) for u in utils):
                raise ValueError(f"arrays do not match {R} ramps")
            consecutive, ok_streak = int(payload["guard"]["consecutive"]), int(payload["ok_streak"])
            hold, since_check = int(payload.get("hold", self.config.backoff_hold_windows)), int(payload["since_check"])
            self.state, self._floors, self._ok_streak, self._hold, self._since_check = (
                state, floors, ok_streak, hold, since_check)
            # The violation count travels; the limits come from this run's config (it may have changed).
            self._guard.consecutive = consecutive
            base = payload.get("base")
            self._base = None if base is None else np.asarray(base, dtype=np.float64)
            self._since_change = [int(x) for x in payload.get("since_change", [0, 0])]
            self._tune_buf.extend(windows)
            self._utils.extend(utils)
            return True
        except Exception as exc:
            logger.warning("could not restore checkpoint %s: %s; starting fresh", self.checkpoint_url, exc)
            return False


# ----------------------------------------------------------------------------- Ray wrappers
_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(ThresholdController)
    return _ACTOR_CLASS


def get_or_create_controller(
    name: str,
    costs: CostModel | dict[str, Any],
    config: ControllerConfig | dict[str, Any] | None = None,
    initial_state: ControllerState | dict[str, Any] | None = None,
    checkpoint_url: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    warm_start: FeedbackWindow | dict[str, Any] | None = None,
):
    """Start the named detached controller actor, or return the running one (its args then ignored).

    The actor takes no CPU (``num_cpus=0``: it must never starve Ray Data on a small machine), restarts
    forever (``max_restarts=-1``; its ``__init__`` restores the checkpoint), and does not retry calls
    that were in flight when it died (``max_task_retries=0``): reports are best-effort feedback and a
    restart loses the partial window anyway, while a state fetch is simply asked again later. Calls made
    while it restarts are queued by Ray and delivered once it is back. ``warm_start`` rows travel with the
    actor's arguments, so a restart with no checkpoint to restore warm-starts again.
    """
    cls = _actor_class()
    c = costs.to_dict() if isinstance(costs, CostModel) else dict(costs)
    cfg = config.model_dump() if isinstance(config, ControllerConfig) else dict(config or {})
    init = initial_state.to_dict() if isinstance(initial_state, ControllerState) else initial_state
    return cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=0,
    ).remote(c, cfg, init, checkpoint_url, warm_start)


class ControllerClient:
    """Worker-side view of the controller. Never raises: the last good state always stands.

    ``report`` is fire-and-forget (failures are counted when their replies come back, or when the
    actor cannot be found); ``maybe_refresh`` fetches the state every ``refresh_every`` batches, or
    sooner when a report reply shows a newer version, waiting at most ``timeout_s``. A fetch that times
    out stays pending and is collected by a later call, so a restarting controller sees one request per
    client, not a pile. A lost handle is looked up again by name, at most every ``reconnect_every_s``.

    Args:
        name, namespace: the controller actor's name and namespace.
        initial_state: state to use until the first fetch (else one fetch is tried at construction).
        refresh_every: batches between fetches for ``maybe_refresh``.
        timeout_s: longest wait for a state fetch.
        reconnect_every_s: least time between name look-ups after a failure.
        max_in_flight: reports whose replies are tracked (older ones are forgotten, not failed).
    """

    def __init__(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        initial_state: ControllerState | dict[str, Any] | None = None,
        refresh_every: int = 8,
        timeout_s: float = 2.0,
        reconnect_every_s: float = 5.0,
        max_in_flight: int = 256,
        handle: Any = None,
    ) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every} must be >= 1")
        self.name = name
        self.namespace = namespace
        self.refresh_every = refresh_every
        self.timeout_s = timeout_s
        self.reconnect_every_s = reconnect_every_s
        self.max_in_flight = max_in_flight
        self._handle = handle
        self._last_lookup = float("-inf")
        self._state = _as_state(initial_state)
        self._pending_get: Any = None
        self._in_flight: deque = deque()
        self._batches = 0
        self._seen_version = -1
        self.reports_sent = 0
        self.reports_failed = 0
        self.refreshes = 0
        self.refresh_failures = 0
        if self._state is None:
            self.refresh()

    # ----- state -----
    @property
    def state(self) -> ControllerState | None:
        return self._state

    @property
    def version(self) -> int:
        """Version of the state in use; -1 before any state was obtained."""
        return -1 if self._state is None else self._state.version

    @property
    def thresholds(self) -> np.ndarray | None:
        return None if self._state is None else np.asarray(self._state.thresholds, dtype=np.float64)

    @property
    def active(self) -> np.ndarray | None:
        return None if self._state is None else np.asarray(self._state.active, dtype=bool)

    @property
    def feedback_fraction(self) -> float:
        """Share of rows the controller asks to be run to the end as feedback (0 when it asks for none)."""
        return 0.0 if self._state is None else float(self._state.feedback_fraction)

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "reports_sent": self.reports_sent,
            "reports_failed": self.reports_failed,
            "refreshes": self.refreshes,
            "refresh_failures": self.refresh_failures,
            "connected": self._handle is not None,
        }

    # ----- calls -----
    def report(self, window: FeedbackWindow | dict[str, Any], output_rows: int = 0) -> bool:
        """Send feedback, drawn from ``output_rows`` answered rows, without waiting. Returns False (and counts
        it) when it could not be sent."""
        try:
            self._reap()
            handle = self._get_handle()
            if handle is None:
                self.reports_failed += 1
                return False
            if isinstance(window, FeedbackWindow):  # numpy arrays travel cheaper than lists
                window = {"conf": window.conf, "pred": window.pred, "final": window.final}
            if output_rows:
                window = {**window, "output_rows": int(output_rows)}
            self._in_flight.append(handle.report.remote(window))
            while len(self._in_flight) > self.max_in_flight:
                self._in_flight.popleft()
            self.reports_sent += 1
            return True
        except Exception as exc:
            self.reports_failed += 1
            self._handle = None
            logger.debug("report to controller %s failed: %s", self.name, exc)
            return False

    def maybe_refresh(self, every_n_batches: int | None = None) -> bool:
        """Count one batch; fetch the state when due (or a newer version was seen). True if updated.

        Between due calls a fetch left pending by a timeout is only polled, never waited for, so an
        unreachable controller costs a worker at most ``timeout_s`` every ``every_n_batches`` batches.
        """
        self._batches += 1
        n = every_n_batches or self.refresh_every
        try:
            self._reap()
        except Exception:
            pass
        due = self._batches % n == 0 or self._seen_version > self.version
        if due:
            return self.refresh()
        if self._pending_get is not None:
            return self.refresh(timeout_s=0.0)
        return False

    def refresh(self, timeout_s: float | None = None) -> bool:
        """Fetch the state now, waiting at most ``timeout_s`` (default: the client's). True if received."""
        import ray
        from ray.exceptions import GetTimeoutError

        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self._pending_get is None:
                handle = self._get_handle()
                if handle is None:
                    self.refresh_failures += 1
                    return False
                self._pending_get = handle.get_state.remote()
            d = ray.get(self._pending_get, timeout=wait)
            self._pending_get = None
            self._state = ControllerState.from_dict(d)
            self.refreshes += 1
            return True
        except GetTimeoutError:
            if wait > 0:
                self.refresh_failures += 1  # keep the request pending; a later call collects it
            return False
        except Exception as exc:
            self._pending_get = None
            self._handle = None
            self.refresh_failures += 1
            logger.debug("state fetch from controller %s failed: %s", self.name, exc)
            return False

    # ----- internals -----
    def _get_handle(self):
        if self._handle is not None:
            return self._handle
        now = time.monotonic()
        if now - self._last_lookup < self.reconnect_every_s:
            return None
        self._last_lookup = now
        try:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except Exception as exc:
            logger.debug("controller %s/%s not found: %s", self.namespace, self.name, exc)
            self._handle = None
        return self._handle

    def _reap(self) -> None:
        """Collect finished report replies: count failures, note the newest version seen."""
        if not self._in_flight:
            return
        import ray

        refs = list(self._in_flight)
        ready, rest = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                self._seen_version = max(self._seen_version, int(ray.get(ref, timeout=0)))
            except Exception:
                self.reports_failed += 1
        self._in_flight = deque(rest)

    def __getstate__(self) -> dict[str, Any]:
        # Handles and object refs are tied to one process; a copied client looks the actor up again.
        d = self.__dict__.copy()
        d["_handle"] = None
        d["_pending_get"] = None
        d["_in_flight"] = deque()
        d["_last_lookup"] = float("-inf")
        return d
