"""What a job's summary says: its counts from the actors' reports, the exits counted from the output's parts, and
what the promise cost."""
from __future__ import annotations

import json
from collections import Counter

from pipeline.config import JobConfig
from pipeline.offline import attempts, sink


def output_exits(output_url: str, num_layers: int) -> dict:
    """The summary's exit statistics counted from the output's parts as they are now (after a top-up or a repair
    rewrote rows with the float original's answers)."""
    import numpy as np
    import pyarrow.parquet as pq

    fs, _ = sink.filesystem(output_url)
    exits = np.zeros(num_layers + 1, np.int64)
    for paths in sink.list_parts(output_url).values():
        for p in paths:
            with fs.open(p, "rb") as f:
                t = pq.read_table(f, columns=["exit_layer", "error"]).to_pydict()
            layers = [layer for layer, err in zip(t["exit_layer"], t["error"]) if err is None]
            exits += np.bincount(layers, minlength=num_layers + 1)[: num_layers + 1]
    answered = int(exits[1:].sum())
    layers_run = float((exits * np.arange(num_layers + 1)).sum())
    return {"exits_per_layer": {str(i): int(exits[i]) for i in range(1, num_layers + 1)},
            "mean_exit_layer": round(layers_run / answered, 3) if answered else None,
            "layer_compute_saved": round(1 - layers_run / (answered * num_layers), 4) if answered else None}


def promise_cost(summaries: list[dict], summary: dict, calibration) -> dict:
    """What the promise cost, as shares of the actors' busy time (what a job's time is made of once its actors
    run): the calibration items; the float original run beside a compressed or half-precision model on
    feedback rows (its reference answers); audit and feedback rows run past their answer (an estimate from
    layer work: a layer costs about the same for every row of a batch); and the rows answered by the float
    original in full because they were reached before the calibration decision."""
    busy = sum(r["seconds"] for r in summaries)
    cal = sum(r["seconds"] for r in summaries if r["kind"] == "calibration")
    bulk = [r for r in summaries if r["kind"] == "bulk"]
    ran = sum(sum(r["layer_rows_after_decision"]) for r in bulk)
    answers = sum(r["bulk_answer_layers"] for r in bulk)
    feedback = (ran - answers) / ran if ran else None
    before = sum(r["seconds_before_decision"] for r in bulk)
    bulk_busy = sum(r["seconds"] - r["seconds_before_decision"] - r["reference_seconds"] for r in bulk)

    def share(x):
        return round(x / busy, 4) if busy else None

    return {
        "actor_seconds": round(busy, 2),
        "calibration_actor_seconds": round(cal, 2),
        "calibration_share_of_actor_time": share(cal),
        "calibration_decided_after_seconds": None if calibration is None else round(calibration.seconds, 2),
        "rows_answered_in_full_before_the_decision": int(sum(r["exact_before_decision"] for r in bulk)),
        "before_decision_share_of_actor_time": share(before),
        "reference_share_of_actor_time": share(sum(r["reference_seconds"] for r in summaries)),
        "bulk_reference_share_of_actor_time": share(sum(r["reference_seconds"] for r in bulk)),
        "feedback_share_of_bulk_layer_work": None if feedback is None else round(feedback, 4),
        "feedback_share_of_actor_time_estimated": None if feedback is None else share(feedback * bulk_busy),
    }


def timeline(summaries: list[dict], t0_wall: float, ray_start: float, pipeline_done: float, calibration,
             total: float) -> dict:
    """Where the job's wall time went, as marks in seconds from the job's start (after Ray started): the first
    item an actor began (start-up: actors built and warmed, the first shard read and tokenized), the calibration
    decision, the last item done (the bulk), the pipeline's end, and the end of the certificate (a top-up
    included) and summary."""
    starts = [r["finished_at"] - r["seconds"] for r in summaries]
    ends = [r["finished_at"] for r in summaries]

    def mark(x):
        return None if x is None else round(max(0.0, x), 2)

    return {"ray_start_s": mark(ray_start),
            "first_item_started_s": mark(min(starts) - t0_wall if starts else None),
            "calibration_decided_s": mark(getattr(calibration, "seconds", None) or None),
            "last_item_done_s": mark(max(ends) - t0_wall if ends else None),
            "pipeline_done_s": mark(pipeline_done),
            "total_s": mark(total)}


def summarize(cfg: JobConfig, shards, finished, rows: list[dict], controller, manifest) -> dict:
    import numpy as np

    L = manifest.num_layers
    work = rows  # every item: calibration items ran layers too
    rows = [r for r in rows if r["kind"] == "bulk"]  # the shards' parts: one row of output per input row
    exits = np.zeros(L + 1, np.int64)
    for r in rows:
        exits += np.asarray(r["exits"], np.int64)
    n = int(sum(r["rows"] for r in rows))
    elapsed = work[0]["_elapsed"] if work else 0.0
    shadow = int(sum(r["shadow_rows"] for r in rows))
    agree = int(sum(r["shadow_agree"] for r in rows))
    answered = int(exits[1:].sum())
    budgets = [int(r["token_budget"]) for r in rows]
    kinds: Counter = Counter()
    for r in rows:
        kinds.update(json.loads(r["errors_by_kind"]))
    per_worker: dict[str, int] = {}
    busy: dict[str, float] = {}  # seconds each actor spent classifying (the rest: start-up, waiting for input)
    for r in work:
        per_worker[r["worker"]] = per_worker.get(r["worker"], 0) + r["rows"]
        busy[r["worker"]] = busy.get(r["worker"], 0.0) + r["seconds"]
    summary = {
        "job": cfg.name,
        "model": cfg.model,
        "input": cfg.input.url,
        "output": cfg.output.url,
        "rows": n,
        "rows_total": int(sum(s.rows for s in shards)),
        "layers": L,
        "shards": len(shards),
        "shards_resumed": len(finished),
        # shard pieces run more than once (an actor or a node lost mid-shard; the retry's part replaced any first)
        "shards_retried": len(retried := attempts.retried(cfg.output.url)),
        "shard_attempts": retried,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(n / elapsed, 1) if elapsed else None,
        "errors": int(sum(r["errors"] for r in rows)),
        # rows per kind of error (pipeline.data.texts.ERROR_KINDS), only the kinds that occurred
        "errors_by_kind": dict(sorted(kinds.items())),
        "truncated": int(sum(r["truncated"] for r in rows)),
        "exits_per_layer": {str(i): int(exits[i]) for i in range(1, L + 1)},
        "mean_exit_layer": round(float((exits * np.arange(L + 1)).sum() / answered), 3) if answered else None,
        "layer_compute_saved": round(1 - float((exits * np.arange(L + 1)).sum()) / (answered * L), 4) if answered else None,
        # The above counts each row at its answer; this counts the layers that ran (calibration, audit and
        # feedback rows run to the end).
        "layer_compute_saved_actual": (round(1 - float(sum(sum(r["layer_rows"]) for r in work)) / (answered * L), 4)
                                       if answered else None),
        # rows an output.filter left out, over the whole output (a resumed job's finished parts count too)
        "filtered_out": int(sum(r["filtered_out"] for r in rows)
                            + sum(p.get("filtered_out", 0) for p in sink.part_stats(cfg.output.url, finished))),
        "shadow_rows": shadow,
        "shadow_agreement": round(agree / shadow, 4) if shadow else None,
        "threshold_versions_seen": sorted({int(r["policy_version"]) for r in rows}),
        # a compression without fast kernels on a node's device is skipped there (EngineConfig.slow_compression)
        "compression_per_worker": {r["worker"]: r["compression"] for r in work},
        # the dtype each actor ended on, and why (engine.dtype auto; the calibration's choice of model)
        "precision_per_worker": {r["worker"]: r["precision"] for r in sorted(work, key=lambda r: r["finished_at"])},
        "rows_per_worker": per_worker,
        "model_seconds_per_worker": {w: round(t, 1) for w, t in busy.items()},
        # the micro-batch token budget at the end of each shard part (it follows the latency target; OOM caps it)
        "token_budget": ({"min": min(budgets), "median": int(np.median(budgets)), "max": max(budgets)}
                         if budgets else None),
    }
    if controller is not None:
        import ray

        try:
            state, described = ray.get([controller["handle"].flush.remote(),
                                        controller["handle"].get_config.remote()], timeout=30)
            summary["controller"] = {"name": controller["name"], "shared": bool(controller.get("joined")),
                                     "version": state["version"], "restores": state.get("restores", 0),
                                     "thresholds": state["thresholds"], "active": state["active"],
                                     "windows": state["windows"], "violations": state["violations"],
                                     "settings": described["config"]}
        except Exception as e:  # noqa: BLE001 - the job's output is complete either way
            summary["controller"] = {"name": controller["name"], "error": repr(e)}
    return summary


def format_summary(summary: dict) -> str:
    return json.dumps(summary, indent=2)
