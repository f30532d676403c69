"""Replay a recorded stream through four exit strategies, window by window (Apparate's own evaluation).

Record every ramp's output once (pipeline.engine.ramp_outputs.record_ramps), then stream the rows in
windows through:

- ``vanilla``: no exits (the original model);
- ``static``: one threshold for every ramp, grid-searched on the bootstrap split under the constraint
  (how DeeBERT / BranchyNet deployments are tuned), never changed;
- ``controller``: a :class:`~pipeline.control.controller.ThresholdController` in the online order: window
  k is served with the state the controller had after window k-1, then reported to it;
- ``oracle``: every ramp active; each row exits at the first ramp that agrees with the final prediction.

Per window: agreement with the original model, layer-compute savings, latency savings (the measured cost
model, ramp costs included), active ramps; for the controller also thresholds, version and tuner time.
``drift_stream`` builds a stream whose domain changes mid-way; ``write_json`` / ``plot`` write the series.

Everything but :func:`plot` (matplotlib) is numpy only.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.config import TuningConfig
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

from .controller import ThresholdController
from .guard import is_violation
from .state import ControllerState, as_state
from .tuner import evaluate, evaluate_stretches, exit_costs, static_threshold_search, tune_thresholds

__all__ = [
    "METHODS",
    "MethodSeries",
    "ReplayResult",
    "window_bounds",
    "oracle_outcome",
    "replay",
    "aggregate",
    "shuffled",
    "hardest",
    "drift_stream",
    "write_json",
    "plot",
]

METHODS = ("vanilla", "static", "controller", "oracle")


# ----------------------------------------------------------------------------- streams
def shuffled(window: FeedbackWindow, seed: int = 0) -> FeedbackWindow:
    """Rows in a deterministic random order (built-in files are sorted, e.g. by label)."""
    return window.take(np.random.default_rng(seed).permutation(len(window)))


def hardest(window: FeedbackWindow, confidence: np.ndarray, share: float = 0.25) -> FeedbackWindow:
    """The rows the original model is least sure of: confidence [N] at or below its ``share`` quantile."""
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    if confidence.shape[0] != len(window):
        raise ValueError(f"confidence has {confidence.shape[0]} rows, the window {len(window)}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share} must be in (0, 1]")
    if len(window) == 0:
        return window
    return window.take(confidence <= np.quantile(confidence, share))


def drift_stream(before: FeedbackWindow, after: FeedbackWindow) -> tuple[FeedbackWindow, int]:
    """``before`` rows then ``after`` rows; returns (stream, first drifted row)."""
    return FeedbackWindow.concat([before, after]), len(before)


def window_bounds(rows: int, window_rows: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering ``rows`` once, in order; a remainder under half a window joins the last one."""
    if window_rows < 1:
        raise ValueError(f"window_rows={window_rows} must be >= 1")
    if rows <= 0:
        return []
    starts = list(range(0, rows, window_rows))
    bounds = [(s, min(s + window_rows, rows)) for s in starts]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < window_rows / 2:
        last = bounds.pop()
        bounds[-1] = (bounds[-1][0], last[1])
    return bounds


def oracle_outcome(window: FeedbackWindow, costs: CostModel) -> tuple[float, float, np.ndarray]:
    """(savings, layer_savings, exit_counts [R]) when each row exits at its first ramp agreeing with the final
    prediction, every ramp active (rows no ramp agrees on run to the end). Agreement is 1 by construction."""
    R, N = window.num_ramps, len(window)
    if N == 0:
        return 0.0, 0.0, np.zeros(R, np.int64)
    act = np.ones(R, bool)
    agree = window.pred == window.final[:, None]  # [N, R]
    exited = agree.any(axis=1)
    j = np.where(exited, agree.argmax(axis=1), 0)
    at_exit, no_exit = exit_costs(costs, act)
    cost = np.where(exited, at_exit[j], no_exit)
    layers = np.where(exited, costs.ramp_layers[j], costs.num_layers)
    return (
        float(1.0 - cost.mean() / costs.full_cost()),
        float(1.0 - layers.mean() / costs.num_layers),
        np.bincount(j[exited], minlength=R).astype(np.int64),
    )


# ----------------------------------------------------------------------------- results
@dataclass
class MethodSeries:
    """One method's per-window series (index k = window k)."""

    name: str
    agreement: list[float] = field(default_factory=list)
    savings: list[float] = field(default_factory=list)  # latency, cost model, ramp costs included
    layer_savings: list[float] = field(default_factory=list)
    exit_rate: list[float] = field(default_factory=list)
    active: list[list[int]] = field(default_factory=list)  # active ramp indices (0-based)
    thresholds: list[list[float]] = field(default_factory=list)
    version: list[int] = field(default_factory=list)  # controller state version used (others: 0)
    rows: list[int] = field(default_factory=list)

    def add(self, rows: int, agreement: float, savings: float, layer_savings: float, exit_rate: float,
            thresholds: np.ndarray, active: np.ndarray, version: int = 0) -> None:
        self.rows.append(int(rows))
        self.agreement.append(float(agreement))
        self.savings.append(float(savings))
        self.layer_savings.append(float(layer_savings))
        self.exit_rate.append(float(exit_rate))
        self.thresholds.append([float(x) for x in thresholds])
        self.active.append(np.flatnonzero(active).tolist())
        self.version.append(int(version))

    def violations(self, constraint: float) -> list[bool]:
        return [is_violation(a, constraint) for a in self.agreement]

    def summary(self, constraint: float, windows: Sequence[int] | None = None) -> dict[str, Any]:
        """Row-weighted agreement/savings over ``windows`` (default all); worst window and violations are
        judged on those windows after the first of the stream (window 0 is served before any feedback)."""
        idx = list(range(len(self.rows))) if windows is None else list(windows)
        if not idx:
            return {}
        w = np.asarray([self.rows[k] for k in idx], np.float64)
        mean = lambda xs: float(np.dot(w, [xs[k] for k in idx]) / w.sum())  # noqa: E731
        judged = [k for k in idx if k > 0] or idx
        worst = min(judged, key=lambda k: self.agreement[k])
        viol = [k for k in judged if is_violation(self.agreement[k], constraint)]
        return {
            "rows": int(w.sum()),
            "windows": len(idx),
            "agreement": mean(self.agreement),
            "worst_window_agreement": self.agreement[worst],
            "worst_window": worst,
            "judged_windows": len(judged),
            "violating_windows": len(viol),
            "violating_window_ids": viol,
            "hold_rate": 1.0 - len(viol) / len(judged),
            "savings": mean(self.savings),
            "layer_savings": mean(self.layer_savings),
            "exit_rate": mean(self.exit_rate),
            "mean_active_ramps": float(np.mean([len(self.active[k]) for k in idx])),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReplayResult:
    """The per-window series of every method for one stream, plus what produced them."""

    name: str
    constraint: float
    window_rows: int
    bounds: list[tuple[int, int]]
    methods: dict[str, MethodSeries]
    static_threshold: float
    controller_config: dict[str, Any]
    controller_history: list[dict[str, Any]]
    tuner_ms: list[float]  # tune_thresholds time per processed window
    window_ms: list[float]  # the controller's whole per-window work (guard, ramp adjustment, tuning)
    drift_at: int | None = None  # first drifted row, if the stream drifts
    costs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def drift_window(self) -> int | None:
        """Index of the first window holding a drifted row."""
        if self.drift_at is None:
            return None
        return next((k for k, (_, stop) in enumerate(self.bounds) if stop > self.drift_at), None)

    def summary(self, segment: str = "all") -> dict[str, dict[str, Any]]:
        """Per-method summary over ``segment``: 'all', 'before' (windows wholly before the drift), 'after'
        (windows holding drifted rows) or 'settled' (after the first drifted window: that one is served with
        the pre-drift state by any controller that learns from feedback)."""
        idx = list(range(len(self.bounds)))
        d = self.drift_window
        if segment == "before":
            idx = idx if d is None else idx[:d]
        elif segment == "after":
            idx = [] if d is None else idx[d:]
        elif segment == "settled":
            idx = [] if d is None else idx[d + 1 :]
        elif segment != "all":
            raise ValueError(f"segment={segment!r} must be 'all', 'before', 'after' or 'settled'")
        return {m: s.summary(self.constraint, idx) for m, s in self.methods.items()}

    def tuner_stats(self) -> dict[str, float]:
        def stats(xs: list[float]) -> dict[str, float]:
            if not xs:
                return {"median": 0.0, "p95": 0.0, "max": 0.0}
            a = np.asarray(xs)
            return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "max": float(a.max())}

        return {"tune_ms": stats(self.tuner_ms), "window_ms": stats(self.window_ms)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "constraint": self.constraint,
            "window_rows": self.window_rows,
            "rows": self.rows,
            "drift_at": self.drift_at,
            "drift_window": self.drift_window,
            "windows": [{"start": a, "stop": b} for a, b in self.bounds],
            "static_threshold": self.static_threshold,
            "controller_config": self.controller_config,
            "costs": self.costs,
            "meta": self.meta,
            "summary": self.summary("all"),
            "summary_before_drift": self.summary("before") if self.drift_at is not None else None,
            "summary_after_drift": self.summary("after") if self.drift_at is not None else None,
            "summary_settled": self.summary("settled") if self.drift_at is not None else None,
            "tuner": self.tuner_stats(),
            "series": {m: s.to_dict() for m, s in self.methods.items()},
            "controller_history": self.controller_history,
        }


# ----------------------------------------------------------------------------- the replay
def _controller_config(constraint: float, window_rows: int, ramp_budget: int | None,
                       overrides: TuningConfig | dict[str, Any] | None) -> TuningConfig:
    if isinstance(overrides, TuningConfig):
        return overrides
    base: dict[str, Any] = {"constraint": constraint, "window_rows": window_rows}
    if ramp_budget is not None:
        base["max_active"] = ramp_budget
    return TuningConfig.model_validate({**base, **(overrides or {})})


def replay(
    stream: FeedbackWindow,
    costs: CostModel,
    bootstrap_window: FeedbackWindow,
    constraint: float = 0.01,
    window_rows: int = 256,
    ramp_budget: int | None = None,
    *,
    initial_state: ControllerState | dict[str, Any] | None = None,
    controller_config: TuningConfig | dict[str, Any] | None = None,
    static_grid: Sequence[float] | None = None,
    drift_at: int | None = None,
    warm_start: bool | FeedbackWindow = False,
    refresh_rows: int | None = None,
    name: str = "stream",
    meta: dict[str, Any] | None = None,
) -> ReplayResult:
    """Stream ``stream`` in windows of ``window_rows`` through vanilla, static, controller and oracle.

    Args:
        stream: recorded ramp outputs, rows in stream order.
        costs: the cost model (measured profile) savings are computed with.
        bootstrap_window: the bootstrap (validation) split's recorded outputs: the static baseline's grid
            search runs on it, and so does the controller's initial tuning when ``initial_state`` is None
            (``constraint * tune_headroom``, every ramp active: what ``offramp bootstrap`` does).
        constraint: largest allowed 1 - agreement per window.
        window_rows: rows per window; also the controller's window unless ``controller_config`` says otherwise.
        ramp_budget: the controller's most active ramps (``TuningConfig.max_active``; None = its default).
        initial_state: the controller's starting state, e.g. the artifact manifest's thresholds/active set.
        controller_config: ``TuningConfig`` fields overriding the defaults (a dict), or a whole config.
        static_grid: thresholds the static baseline may pick from (default: the tuner's 0.50..0.999 grid).
        drift_at: first drifted row of the stream (for the summary and the plot), if any.
        warm_start: rows the controller processes (whole windows of them) before the stream, so its first
            re-tunes see them too instead of a single stream window: what a deployed controller does with the
            artifact's ``validation_feedback.safetensors`` (pass it here); True = ``bootstrap_window``.
        refresh_rows: the controller's state is fetched (and the rows reported) every this many rows, as
            workers refresh every few batches; default: once per window (window k is served with the state
            after window k-1 throughout). Finer refreshes let an early back-off act within a window.
    """
    if stream.num_ramps != costs.num_ramps or bootstrap_window.num_ramps != costs.num_ramps:
        raise ValueError(
            f"stream has {stream.num_ramps} ramps, bootstrap window {bootstrap_window.num_ramps}, cost model"
            f" {costs.num_ramps}; record them with the same artifact"
        )
    if len(stream) == 0:
        raise ValueError("replay needs a non-empty stream")
    if refresh_rows is not None and refresh_rows < 1:
        raise ValueError(f"refresh_rows={refresh_rows} must be >= 1 (or None: once per window)")
    R = costs.num_ramps
    all_on = np.ones(R, bool)
    cfg = _controller_config(constraint, window_rows, ramp_budget, controller_config)

    static = static_threshold_search(bootstrap_window, costs, constraint, grid=static_grid, active=all_on)
    static_thr = static.thresholds
    # No grid value fits: the baseline deploys no exits, so it pays for no ramps either.
    static_act = all_on if bool((static_thr < CLOSED).any()) else np.zeros(R, bool)
    if initial_state is None:
        boot = tune_thresholds(bootstrap_window, costs, constraint * cfg.tune_headroom, all_on,
                               init_step=cfg.init_step, min_step=cfg.min_step)
        initial_state = ControllerState(version=0, thresholds=[float(x) for x in boot.thresholds],
                                        active=[True] * R)
    warm = bootstrap_window if warm_start is True else (warm_start or None)
    ctl = ThresholdController(costs, cfg, initial_state, warm_start=warm)
    warm_windows = ctl.state.warm_windows

    series = {m: MethodSeries(m) for m in METHODS}
    closed = np.full(R, CLOSED)
    history: list[dict[str, Any]] = []
    bounds = window_bounds(len(stream), window_rows)
    refresh = refresh_rows or window_rows
    seen = max((h["seq"] for h in ctl.history()), default=0)  # warm-start rows are not the stream's
    for start, stop in bounds:
        w = stream.slice(start, stop)
        n = len(w)
        series["vanilla"].add(n, 1.0, 0.0, 0.0, 0.0, closed, np.zeros(R, bool))

        out = evaluate(w, costs, static_thr, static_act)
        series["static"].add(n, out.agreement, out.savings, out.layer_savings, out.exit_rate, static_thr, static_act)

        # Serve each block of `refresh` rows with the controller's state after the rows before it, then report
        # the block (it re-tunes on every full window, and may back off within one).
        served, first = [], None
        for a in range(0, n, refresh):
            block = w.slice(a, min(a + refresh, n))
            st = ctl.get_state()
            first = first or st
            served.append((a + len(block), np.asarray(st["thresholds"], np.float64), np.asarray(st["active"], bool)))
            ctl.report(block)
            new = [h for h in ctl.history() if h["seq"] > seen]
            history += new
            seen = max((h["seq"] for h in new), default=seen)
        mix = evaluate_stretches(w, costs, served)
        series["controller"].add(n, mix["agreement"], mix["savings"], mix["layer_savings"], mix["exit_rate"],
                                 np.asarray(first["thresholds"]), np.asarray(first["active"], bool), first["version"])

        sav, lsav, counts = oracle_outcome(w, costs)
        series["oracle"].add(n, 1.0, sav, lsav, float(counts.sum() / n), closed, all_on)

    ends = [h for h in history if h["action"] != "early_backoff"]  # one per window
    tuner_ms, window_ms = [float(h["tune_ms"]) for h in ends], [float(h["window_ms"]) for h in ends]
    early = len(history) - len(ends)
    return ReplayResult(
        name=name,
        constraint=constraint,
        window_rows=window_rows,
        bounds=bounds,
        methods=series,
        static_threshold=float(static_thr[0]) if static_thr[0] < CLOSED else CLOSED,
        controller_config=cfg.resolved().model_dump(),
        controller_history=history,
        tuner_ms=tuner_ms,
        window_ms=window_ms,
        drift_at=drift_at,
        costs=costs.to_dict(),
        meta={"static_bootstrap_agreement": static.agreement, "static_bootstrap_savings": static.savings,
              "warm_start_windows": warm_windows,
              "refresh_rows": refresh,
              "early_backoffs": early,
              "initial_state": as_state(initial_state).to_dict(),
              **(meta or {})},
    )


def aggregate(results: Sequence[ReplayResult], segment: str = "all") -> dict[str, dict[str, Any]]:
    """Per-method totals over several replays of the same scenario (e.g. other stream orders): violating /
    judged windows summed, agreement and savings averaged, the worst window over all of them."""
    out: dict[str, dict[str, Any]] = {}
    if not results:
        return out
    per = [r.summary(segment) for r in results]
    for m in results[0].methods:
        rows = [p[m] for p in per if p.get(m)]
        if not rows:
            continue
        viol = sum(r["violating_windows"] for r in rows)
        judged = sum(r["judged_windows"] for r in rows)
        sav = np.array([r["savings"] for r in rows])
        out[m] = {
            "replays": len(rows),
            "agreement": float(np.mean([r["agreement"] for r in rows])),
            "worst_window_agreement": float(min(r["worst_window_agreement"] for r in rows)),
            "violating_windows": int(viol),
            "judged_windows": int(judged),
            "hold_rate": 1.0 - viol / judged if judged else 1.0,
            "savings": float(sav.mean()),
            "savings_std": float(sav.std()),
            "layer_savings": float(np.mean([r["layer_savings"] for r in rows])),
            "mean_active_ramps": float(np.mean([r["mean_active_ramps"] for r in rows])),
        }
    return out


# ----------------------------------------------------------------------------- output
def write_json(results: Sequence[ReplayResult], path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Every scenario's series and summaries as one JSON file (``extra`` adds top-level keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {}),
               "scenarios": {r.name: r.to_dict() for r in results}}
    path.write_text(json.dumps(payload, indent=1))
    return path


_STYLE = {
    "vanilla": dict(color="0.45", ls=":", lw=1.5),
    "static": dict(color="tab:red", ls="--", lw=1.8, marker="s", ms=3),
    "controller": dict(color="tab:blue", ls="-", lw=2.0, marker="o", ms=3),
    "oracle": dict(color="tab:green", ls="-.", lw=1.5),
}


def plot(results: Sequence[ReplayResult], path: str | Path, title: str | None = None) -> Path:
    """One column per scenario: agreement, savings and active ramps per window, constraint and drift marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(results)
    fig, axes = plt.subplots(3, n, figsize=(6.5 * n, 9), squeeze=False, sharex="col",
                             gridspec_kw={"height_ratios": [3, 3, 1.3]})
    for c, res in enumerate(results):
        x = np.array([stop for _, stop in res.bounds])  # rows streamed at the end of each window
        ax_a, ax_s, ax_r = axes[0, c], axes[1, c], axes[2, c]
        lo = 1.0 - res.constraint
        for m in METHODS:
            s = res.methods[m]
            ax_a.plot(x, 100 * np.asarray(s.agreement), label=m, **_STYLE[m])
            ax_s.plot(x, 100 * np.asarray(s.savings), label=m, **_STYLE[m])
        ax_a.axhline(100 * lo, color="k", lw=1, ls="--", alpha=0.7, label=f"constraint ({100 * lo:.0f}%)")
        low = min(min(res.methods[m].agreement) for m in METHODS)
        ax_a.set_ylim(100 * min(lo - res.constraint, low - 0.005), 100.3)
        ax_a.set_ylabel("agreement with original (%)")
        ax_s.set_ylabel("latency savings (%)")
        for m, style in (("static", _STYLE["static"]), ("controller", _STYLE["controller"])):
            edges = [res.bounds[0][0]] + [stop for _, stop in res.bounds]
            ax_r.stairs([len(a) for a in res.methods[m].active], edges, label=m, color=style["color"],
                        ls=style["ls"], lw=1.8, baseline=None)
        ax_r.legend(fontsize=8, loc="lower right")
        ax_r.set_ylabel("active ramps")
        ax_r.set_xlim(0, res.rows * 1.01)
        ax_r.set_ylim(-0.3, len(res.methods["oracle"].active[0]) + 0.5)
        ax_r.set_xlabel("rows streamed (end of window)")
        ax_a.set_title(f"{res.name}: {len(res.bounds)} windows of {res.window_rows} rows")
        if res.drift_at is not None:
            for ax in (ax_a, ax_s, ax_r):
                ax.axvline(res.drift_at, color="tab:purple", lw=1.5, alpha=0.8)
            ax_a.annotate("drift", (res.drift_at, 100 * lo), xytext=(4, -14), textcoords="offset points",
                          color="tab:purple")
        for ax in (ax_a, ax_s, ax_r):
            ax.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if any(r.drift_at is not None for r in results):
        handles.append(plt.Line2D([], [], color="tab:purple", lw=1.5))
        labels.append("drift starts")
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, bbox_to_anchor=(0.5, 0.965))
    if title:
        fig.suptitle(title, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
