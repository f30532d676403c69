"""The threshold controller's logic: windows of feedback in, versioned thresholds and active ramps out.

A plain class, testable without Ray (pipeline.control.actor runs it as the one named actor of a deployment;
pipeline.control.client is what workers hold). What it does per window and why: docs/controller.md.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any, Sequence

import numpy as np

from pipeline.config import TuningConfig
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

from .guard import AccuracyGuard, GuardAction, back_off, violating_ramps
from .ramp_adjust import RampBudget, adjust_ramps, candidate_gains, ramp_utilities
from .state import ControllerState, as_state
from .stats import binom_sf, wilson
from .tuner import TuneResult, evaluate, evaluate_stretches, tune_thresholds

__all__ = ["ThresholdController"]

logger = logging.getLogger(__name__)

_CHECKPOINT_FORMAT = 1


class ThresholdController:
    """Controller logic: windows of feedback in, versioned thresholds and active ramps out.

    Args:
        costs: latency/compute profile (``CostModel`` or its ``to_dict()``).
        config: ``TuningConfig`` or a dict of its fields.
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
        config: TuningConfig | dict[str, Any] | None = None,
        initial_state: ControllerState | dict[str, Any] | None = None,
        checkpoint_url: str | None = None,
        warm_start: FeedbackWindow | dict[str, Any] | None = None,
    ) -> None:
        self.costs = costs if isinstance(costs, CostModel) else CostModel.from_dict(costs)
        config = config if isinstance(config, TuningConfig) else TuningConfig.model_validate(config or {})
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

        state = as_state(initial_state) or ControllerState.initial(R)
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
        self._choose_feedback()  # also when the certified thresholds equal those in force (no new version)
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
        """The guard's test on ``rows`` served rows at ``agreement`` (TuningConfig.guard_alpha)."""
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
        self._since_change[0] += int(round((1.0 - agreement) * rows))
        self._since_change[1] += rows
        self._choose_feedback()

    def _choose_feedback(self) -> None:
        """The share of rows workers run to the end for the controller: ``feedback_max`` while evidence is thin,
        else ``feedback_min``. Tuning: thin until the Wilson upper bound of the disagreement served since the
        thresholds last changed is within the budget. Holding certified thresholds: thin only while a back-off
        holds, since they come with the calibration sample's evidence (and sit near the budget by design, so that
        bound would stay above it for thousands of rows)."""
        cfg = self.config
        if cfg.feedback_max <= 0:
            return
        thin = self._floors.any() if self._base is not None else wilson(*self._since_change)[1] > cfg.constraint
        self.state.feedback_fraction = cfg.feedback_max if thin else cfg.feedback_min

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
        self._choose_feedback()  # new thresholds: no evidence served at them yet
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
            from pipeline.data import storage

            # a temporary name, then a move (a copy on object stores): a crash never leaves half a checkpoint
            storage.write_atomic(self.checkpoint_url, json.dumps(self._checkpoint_payload()))
        except Exception as exc:  # never let storage trouble stop tuning
            self.checkpoint_errors += 1
            logger.warning("controller checkpoint to %s failed: %s", self.checkpoint_url, exc)

    def _restore(self) -> bool:
        try:
            from pipeline.data import storage

            fs, path = storage.filesystem(self.checkpoint_url)
            fs.invalidate_cache(path)
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
