"""`offramp replay`: record every ramp's output once, replay the stream through vanilla / static / controller /
oracle, in-domain and under drift; print the tables, write JSON + PNG. Thin: the replay is
pipeline.control.replay, the inputs and their recordings replay_inputs.py, the printed report replay_report.py.
"""
from __future__ import annotations

import click

from pipeline.commands import replay_report as report
from pipeline.commands.replay_inputs import Recordings, bootstrap_and_stream, shuffled_texts

DOMAINS = ("amazon-reviews", "tweets", "nyt-editorials")
DRIFTS = ("hard", *DOMAINS, "none")
HARD_SHARE = 0.25
"""`--drift hard`: the share of each other domain's rows, by the original model's confidence, that streams."""


def _parse_sets(pairs: tuple[str, ...]) -> dict:
    """`key=value` pairs -> TuningConfig overrides (values parsed as JSON when they parse)."""
    import json

    from pipeline.config import TuningConfig

    known = set(TuningConfig.model_fields)
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


@click.command()
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Early-exit artifact directory (from `offramp bootstrap`).")
@click.option("--data", default="movie-reviews", show_default=True,
              help="Built-in dataset (its test split streams, its validation split bootstraps) or a parquet/jsonl/csv path/URL.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--constraint", default=None, type=float, help="Accuracy budget per window [default: the artifact's (0.01), less what a compressed artifact's check lost, as deployed].")
@click.option("--ramp-budget", default=None, type=int, help="Most active ramps for the controller [default: TuningConfig's: no cap, only the tail budget].")
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
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="TuningConfig override, e.g. --set tune_windows=4.")
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

    from pipeline.config import TuningConfig
    from pipeline.control.deployment import controller_constraint, cost_model, initial_state, warm_start_window
    from pipeline.control.replay import aggregate, drift_stream, hardest, plot, shuffled, write_json
    from pipeline.control.replay import replay as run_replay
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
        window_rows = window_rows or TuningConfig.model_validate(
            {"constraint": constraint, **overrides}).resolved().window_rows
        costs = cost_model(manifest)
        boot_texts, stream_texts, desc = bootstrap_and_stream(data, text_column, seed, limit, manifest)
        domains = [d for d in DOMAINS if d != data] if drift == "hard" else [] if drift == "none" else [drift]
        drift_texts = {d: shuffled_texts(load_dataset(d), seed, limit) for d in domains}
    except (FileNotFoundError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if not stream_texts or not boot_texts:
        raise click.ClickException(f"--data {data!r} left {len(boot_texts)} bootstrap / {len(stream_texts)} stream rows")

    out_dir = Path(out)
    record = Recordings(model_dir, device, out_dir / "recordings", reuse=not rerecord)
    boot, _ = record(boot_texts, "bootstrap")
    stream, _ = record(stream_texts, "stream")
    drifted, drift_desc = None, ""
    if drift_texts:
        parts = []
        for d, texts in drift_texts.items():
            w, score = record(texts, f"drift-{d}")
            parts.append(hardest(w, score, HARD_SHARE) if drift == "hard" else w)
        drifted = shuffled(FeedbackWindow.concat(parts), seed)
        drift_desc = (f"the {int(HARD_SHARE * 100)}% hardest rows (original model's confidence) of "
                      f"{', '.join(drift_texts)}" if drift == "hard" else f"all of {drift}")

    # Warm start as deployments do it (pipeline.control.deployment): the artifact's own validation feedback.
    artifact_warm = warm_start_window(model_dir, manifest) if warm_start is not False else None
    warm = artifact_warm if artifact_warm is not None else bool(warm_start)
    warm_desc = ("the artifact's validation feedback (warm start, as deployments do)" if artifact_warm is not None
                 else "the recorded bootstrap rows (warm start)" if warm else "no feedback (cold start)")
    common = dict(constraint=constraint, window_rows=window_rows, ramp_budget=ramp_budget,
                  initial_state=initial_state(manifest), controller_config=overrides, warm_start=warm,
                  refresh_rows=min(refresh_rows, window_rows))
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
    aggregates: dict[str, dict] = {}
    lines = report.header(model_dir, constraint, window_rows, sum(record.seconds.values()), results[0], len(boot),
                          warm_desc)
    for key, res in zip(runs, results):
        lines += report.scenario(res, runs[key], orders, layers, aggregates, key, aggregate)
    hind = _hindsight(stream, drifted, costs, constraint)
    lines += [""] + _targets(stream, costs, constraint, runs, results, aggregates, orders, hind)
    for line in lines:
        click.echo(line)

    extra = {"model": str(model_dir), "data": data, "drift": drift, "constraint": constraint,
             "hindsight": hind, "orders": orders, "aggregates": aggregates,
             "window_rows": window_rows, "refresh_rows": min(refresh_rows, window_rows), "ramp_layers": layers,
             "seed": seed, "limit": limit,
             "warm_start": "artifact" if artifact_warm is not None else "bootstrap rows" if warm else False,
             "recording_seconds": {"bootstrap": record.seconds.get("bootstrap", 0.0),
                                   "stream": record.seconds.get("stream", 0.0),
                                   "drift": sum(v for k, v in record.seconds.items() if k.startswith("drift-"))},
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


def _hindsight(stream, drifted, costs, constraint: float) -> dict:
    """Per-ramp thresholds tuned on the very rows they are judged on (every ramp, full constraint): what
    thresholds could save at best, knowing the rows in advance (the oracle ignores the constraint)."""
    from pipeline.control.tuner import tune_thresholds

    hind = {"in-domain": tune_thresholds(stream, costs, constraint).to_dict()}
    if drifted is not None:
        hind["after-drift"] = tune_thresholds(drifted, costs, constraint).to_dict()
    return hind


def _targets(stream, costs, constraint: float, runs: dict, results: list, aggregates: dict, orders: int,
             hind: dict) -> list[str]:
    """The targets lines: the controller against static and the oracle, in-domain and after the drift."""
    import numpy as np

    from pipeline.control.replay import aggregate
    from pipeline.control.tuner import static_threshold_search

    ind = results[0]
    lines = []
    for label, s in (("seed order", ind.summary()), (f"{orders} orders", aggregates["in-domain/all"])):
        if label != "seed order" and orders == 1:
            continue
        eq = static_threshold_search(stream, costs, max(0.0, 1.0 - s["controller"]["agreement"]),
                                     grid=np.arange(500, 1000) / 1000)
        lines.append(report.in_domain_targets(label, s, constraint, eq))
    lines.append(report.hindsight("in-domain", "the stream itself", hind["in-domain"]))
    if runs["drift"]:
        if orders > 1:
            aggregates["drift/settled"] = aggregate(runs["drift"], "settled")
        for label, after, settled, whole, c in (
            ("seed order", results[1].summary("after"), results[1].summary("settled"), results[1].summary(),
             ind.summary()["controller"]),
            (f"{orders} orders", aggregates["drift/after"], aggregates.get("drift/settled"), aggregates["drift/all"],
             aggregates["in-domain/all"]["controller"]),
        ):
            if label != "seed order" and orders == 1:
                continue
            lines.append(report.drift_targets(label, after, settled, whole, c))
        lines.append(report.hindsight("drift", "the drifted rows themselves", hind["after-drift"]))
    return lines


if __name__ == "__main__":  # pragma: no cover - python -m pipeline.commands.replay
    replay()
