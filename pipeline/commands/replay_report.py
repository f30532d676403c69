"""`offramp replay`'s printed report: the per-method tables, the controller's settings and the targets line.
Every function returns lines; the command echoes them."""
from __future__ import annotations


def _layers(active: list[int], ramp_layers: list[int]) -> str:
    if not active:
        return "none"
    ls = [ramp_layers[i] for i in active]
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"L{ls[0]}-{ls[-1]}"
    return "L" + ",".join(map(str, ls))


def _over_time(series, ramp_layers: list[int]) -> str:
    """Runs of windows sharing one active set: 'w0-3 L1-5 | w4-15 L1,4,5'."""
    runs: list[list] = []
    for k, a in enumerate(series.active):
        s = _layers(a, ramp_layers)
        if runs and runs[-1][2] == s:
            runs[-1][1] = k
        else:
            runs.append([k, k, s])
    return " | ".join(f"w{a}" + (f"-{b}" if b > a else "") + f" {s}" for a, b, s in runs)


def table(summ: dict, res, ramp_layers: list[int]) -> list[str]:
    """One row per method; ``res`` (one replay) adds the controller's active ramps over time."""
    head = (f"{'method':<11}{'agreement':>10}{'worst win':>11}{'violating':>11}{'layer sav':>11}"
            f"{'latency sav':>13}  active ramps (mean" + (", over time)" if res is not None else ")"))
    lines = [head, "-" * len(head)]
    for m, s in summ.items():
        if not s:
            continue
        viol = f"{s['violating_windows']}/{s['judged_windows']}"
        detail = ""
        if res is not None:
            series = res.methods[m]
            detail = ": " + (_over_time(series, ramp_layers) if m == "controller"
                             else _layers(series.active[0], ramp_layers))
        lines.append(
            f"{m:<11}{100 * s['agreement']:>9.2f}%{100 * s['worst_window_agreement']:>10.2f}%{viol:>11}"
            f"{100 * s['layer_savings']:>10.1f}%{100 * s['savings']:>12.1f}%  {s['mean_active_ramps']:.1f}{detail}"
        )
    return lines


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def _held(s: dict) -> str:
    return f"{s['judged_windows'] - s['violating_windows']}/{s['judged_windows']}"


def header(model_dir: str, constraint: float, window_rows: int, recording_s: float, ind, boot_rows: int,
           warm_desc: str) -> list[str]:
    cfg = ind.controller_config
    return [
        f"offramp replay: {model_dir}, constraint {constraint}, windows of {window_rows} rows; recording "
        f"{recording_s:.1f}s (0 = cached)",
        f"controller: max_active={cfg['max_active']}, tune_windows={cfg['tune_windows']}, "
        f"tune_headroom={cfg['tune_headroom']}, backoff_after={cfg['backoff_after']}, backoff_hold_windows="
        f"{cfg['backoff_hold_windows']}; starts from the manifest's thresholds and {warm_desc} "
        f"({ind.meta['warm_start_windows']} windows), state refreshed every {ind.meta['refresh_rows']} rows "
        f"(early_guard={cfg['early_guard']}, recent_windows={cfg['recent_windows']}); "
        f"static: one threshold {ind.static_threshold:.3f} for every ramp (grid search on {boot_rows} "
        f"bootstrap rows)",
    ]


def scenario(res, runs: list, orders: int, layers: list[int], aggregates: dict, key: str, aggregate) -> list[str]:
    """One scenario's tables (seed order, and over every order), tuner timings and final thresholds; fills
    `aggregates[f"{key}/{segment}"]`."""
    cfg = res.controller_config
    lines = ["", f"== {res.name}: {res.meta['data']}, {res.rows} rows, {len(res.bounds)} windows "
                 "(worst window and violations judged after the first window)"]
    segments = ["all"] if res.drift_at is None else ["all", "after"]
    for seg in segments:
        if seg == "after":
            lines.append(f"-- after the drift (row {res.drift_at}, from window {res.drift_window}):")
        lines += table(res.summary(seg), res, layers)
    for seg in segments:
        agg = aggregates[f"{key}/{seg}"] = aggregate(runs, seg)
        if orders > 1:
            where = "after the drift, " if seg == "after" else ""
            lines.append(f"-- {where}over {orders} stream orders (rows reshuffled; violating windows summed, "
                         "worst = lowest window of all):")
            lines += table(agg, None, layers)
    t = res.tuner_stats()
    lines.append(
        f"tuner per window: median {t['tune_ms']['median']:.1f} ms, p95 {t['tune_ms']['p95']:.1f} ms, "
        f"max {t['tune_ms']['max']:.1f} ms ({len(res.tuner_ms)} windows, each tuned on up to "
        f"{cfg['tune_windows']} x {cfg['window_rows']} rows); whole controller step (guard, ramp "
        f"adjustment, tuning): median {t['window_ms']['median']:.1f} ms, max {t['window_ms']['max']:.1f} ms; "
        f"early back-offs within a window: {sum(r.meta['early_backoffs'] for r in runs)} over {len(runs)} orders")
    final = res.methods["controller"].thresholds[-1]
    lines.append("controller thresholds at the last window: " + (", ".join(
        f"L{layers[i]} " + ("closed" if final[i] >= 1.0 else f"{final[i]:.3f}")
        for i in res.methods["controller"].active[-1]) or "no active ramp"))
    return lines


def in_domain_targets(label: str, s: dict, constraint: float, static_at_controller) -> str:
    """`static_at_controller`: the best one-threshold setting at the controller's agreement, picked in hindsight."""
    c, st, o = s["controller"], s["static"], s["oracle"]
    eq = static_at_controller
    return (f"targets (in-domain, {label}): windows after the first at >= {100 * (1 - constraint):.0f}%: "
            f"controller {_held(c)}, static {_held(st)}; latency savings controller {pct(c['savings'])} at "
            f"{100 * c['agreement']:.2f}% vs static {pct(st['savings'])} at {100 * st['agreement']:.2f}% "
            f"(one threshold at the controller's agreement, picked in hindsight: {pct(eq.savings)} at "
            f"{100 * eq.agreement:.2f}%); controller/oracle {_ratio(c['savings'], o['savings'])} (latency), "
            f"{_ratio(c['layer_savings'], o['layer_savings'])} (layers)")


def drift_targets(label: str, after: dict, settled: dict | None, whole: dict, in_domain_controller: dict) -> str:
    c = in_domain_controller
    later = ("; after the first drifted window (served with the pre-drift state, at least until its first drifted "
             f"rows come back as feedback): static {_held(settled['static'])}, controller "
             f"{_held(settled['controller'])}" if settled and settled.get("static") else "")
    return (f"targets (drift, {label}): windows within the constraint after the drift: static "
            f"{_held(after['static'])}, controller {_held(after['controller'])}{later} (whole stream: static "
            f"{_held(whole['static'])}, controller {_held(whole['controller'])}); controller savings after "
            f"the drift {pct(after['controller']['savings'])} = {_ratio(after['controller']['savings'], c['savings'])}"
            f" of its in-domain {pct(c['savings'])}")


def hindsight(scenario_name: str, rows_desc: str, tuned: dict) -> str:
    return (f"hindsight ({scenario_name}): per-ramp thresholds tuned on {rows_desc} save "
            f"{pct(tuned['savings'])} at {100 * tuned['agreement']:.2f}%")
