"""The offline job driver: plan, check, then stream shards through tokenize tasks and the actor pool.

    read shards --tokenize (Ray tasks)--> EarlyExitWorker pool (ActorPoolStrategy, num_gpus/num_cpus)
       --> part-NNNNNN.parquet per shard (atomic, deterministic) + _offramp_summary.json

Everything that can be checked before model work is checked first: the model artifact, the input
(files, rows, the text column), the output (not silently mixed with an older job's parts).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections import Counter
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.control.deployment import ControllerMismatch, controller_constraint, own_controller_name, start_controller
from pipeline.data.readers import require_columns
from pipeline.offline import attempts, ray_session, sink
from pipeline.offline.shards import plan_shards, read_shard

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """A job that cannot start or finish, with a message saying why and what to do."""


def materialize_builtin(url: str, cache_dir: str = "artifacts/data") -> str:
    """`builtin:NAME` -> a parquet file with id, text, gold_label (as a string). `builtin:A+B+C`: those
    datasets one after another, as a corpus of several domains arrives (ids prefixed `A/`, `B/`, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import load_dataset

    name = url.removeprefix("builtin:")
    path = Path(cache_dir) / f"{name}.parquet"
    if not path.exists():
        parts = name.split("+")
        tables = []
        for part in parts:
            ds = load_dataset(part)
            ids = ds.ids or [str(i) for i in range(len(ds))]
            cols = {"id": [f"{part}/{i}" for i in ids] if len(parts) > 1 else ids, "text": ds.texts}
            if ds.labels is not None:
                cols["gold_label"] = [ds.label_names[i] for i in ds.labels]
            tables.append(pa.table(cols))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.concat_tables(tables), path)
    return str(path.resolve())


def _init_ray(cfg: JobConfig, address: str | None) -> bool:
    """Connect or start an embedded Ray; True if this call started it."""
    import ray

    from pipeline.data import storage

    if ray.is_initialized():
        if storage.missing_in_ray(ray.get_runtime_context().runtime_env):
            raise JobError("Ray was started before this job's `storage:` settings could reach its workers; let "
                           "offramp start or join Ray (--address), or start it with "
                           "ray.init(runtime_env={'env_vars': pipeline.data.storage.ray_env_vars()})")
        return False
    # The job's storage settings travel to every task and actor with the job (pipeline.data.storage).
    env = storage.ray_env_vars()
    runtime_env = {"env_vars": env} if env else None
    # ray_session: SIGTERM / SIGINT stop the job through its `finally:`, and ray_session.shutdown() leaves nothing
    if address:
        ray_session.init(address=address, log_to_driver=True, runtime_env=runtime_env)
        return True
    local = cfg.local_ray
    ray_session.init(num_cpus=local.num_cpus, num_gpus=local.num_gpus, object_store_memory=local.object_store_memory,
                     include_dashboard=False, runtime_env=runtime_env)
    return True


def check_inputs(cfg: JobConfig):
    """(manifest, shards, already finished shards) — everything checked before any model work."""
    from pipeline.data import storage
    from pipeline.model.artifact import read_manifest

    storage.configure(cfg.storage)
    try:  # a URL is checked here, in the driver: a wrong bucket or missing credentials fail before any actor starts
        manifest = read_manifest(cfg.model)
    except storage.StorageError as e:
        raise JobError(str(e)) from e
    except FileNotFoundError as e:
        raise JobError(f"model {cfg.model!r} does not exist or is not an early-exit artifact; create it with "
                       "`offramp bootstrap` (or `offramp demo`)") from e
    # Tolerant JSONL (a bad line is a row with an error) unless input.strict: then a bad line fails here.
    text = None if cfg.input.strict else cfg.input.text_column
    try:
        shards = plan_shards(cfg.input.url, cfg.input.rows_per_shard, min_shards=2 * cfg.actors.max_actors,
                             text_column=text)
    except (FileNotFoundError, ValueError) as e:
        raise JobError(f"cannot read input: {e}") from e
    first = read_shard(shards[0], text)
    try:
        require_columns(first, [cfg.input.text_column, cfg.input.id_column, *cfg.input.passthrough], cfg.input.url,
                        "set input.text_column / input.id_column / input.passthrough in the job YAML (or --text-column)")
    except ValueError as e:
        raise JobError(f"input {e}") from e
    plan = {"input": cfg.input.url, "text_column": cfg.input.text_column, "rows_per_shard": cfg.input.rows_per_shard,
            "shards": [s.to_dict() for s in shards]}
    try:
        storage.check_writable(cfg.output.url, "output")
        if cfg.controller.enabled and cfg.controller.checkpoint_url:
            ckpt = cfg.controller.checkpoint_url
            storage.check_writable(ckpt.rsplit("/", 1)[0] if "/" in ckpt else ".", "controller.checkpoint_url")
    except storage.StorageError as e:
        raise JobError(str(e)) from e
    existing = sink.list_parts(cfg.output.url)
    if existing and not cfg.resume:
        raise JobError(
            f"output {cfg.output.url!r} already holds parts of {len(existing)} shards; pass --resume to finish an "
            "interrupted job there, or choose an empty output URL"
        )
    finished: set[int] = set()
    if cfg.resume and existing:
        old = sink.read_json(cfg.output.url, sink.PLAN)
        if old is not None and old["shards"] != plan["shards"]:
            raise JobError(
                f"--resume: the input at {cfg.input.url!r} no longer matches the plan the output was written "
                "with (files or row counts changed); write to a new output URL instead"
            )
        finished = sink.finished_shards(cfg.output.url, {s.shard: s.rows for s in shards})
    return manifest, shards, finished, plan


def run_job(cfg: JobConfig, address: str | None = None, echo=print) -> dict:
    import ray

    if cfg.input.url.startswith("builtin:"):
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"url": materialize_builtin(cfg.input.url)})})
    manifest, shards, finished, plan = check_inputs(cfg)
    todo = [s for s in shards if s.shard not in finished]
    sink.clean_temporaries(cfg.output.url)
    attempts.clear(cfg.output.url)
    sink.write_json(cfg.output.url, sink.PLAN, plan)
    total_rows = sum(s.rows for s in shards)
    echo(f"{cfg.name}: {total_rows} rows in {len(shards)} shards"
         + (f" ({len(finished)} already finished, resuming)" if finished else ""))

    started = _init_ray(cfg, address)
    t0 = time.perf_counter()
    controller = None
    try:
        constraint = controller_constraint(manifest)
        c = cfg.certify
        defaults = None if not c.enabled else {
            "window_output_rows": c.window_output_rows, "guard_alpha": 1 - c.confidence,
            "feedback_min": c.feedback_min, "feedback_max": c.feedback_max}
        try:
            controller = start_controller(cfg.model, manifest, cfg.controller, thresholds=cfg.engine.thresholds,
                                          own_name=own_controller_name("job", cfg.name, uuid.uuid4().hex[:8]),
                                          defaults=defaults, warm_start=not c.enabled)
        except ControllerMismatch as e:
            raise JobError(str(e)) from e
        certify = calibration = None
        if c.enabled and todo:
            if c.calibrate:
                from pipeline.offline.calibrate import calibrate_job

                calibration = calibrate_job(cfg, shards, manifest, constraint, echo)
                thresholds = calibration.thresholds
                cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"thresholds": thresholds})})
                if controller is not None:
                    ray.get(controller["handle"].calibrate.remote(thresholds, calibration.report), timeout=60)
            bulk = total_rows - (calibration.rows if calibration else 0)
            audit = audit_fraction(c, calibration.report if calibration else None, bulk, total_rows, constraint)
            echo(f"audit: {audit:.1%} of the bulk rows run to the end for the certificate")
            certify = {"audit_fraction": audit, "seed": c.seed, "calibrated": calibration.answers if calibration else {}}
        summaries = _run_pipeline(cfg, todo, controller, certify) if todo else []
        summary = _summarize(cfg, shards, finished, summaries, controller, manifest)
        summary["seconds_total"] = round(time.perf_counter() - t0, 3)
        if c.enabled:
            cert = _certificate(cfg, summaries, finished, constraint, calibration, certify, summary)
            if not cert["certified"] and c.top_up:
                cert = _top_up(cfg, shards, cert, constraint, summary, echo)
            summary["certificate"] = cert
    finally:
        if controller is not None and not cfg.controller.share:  # the job's own: gone with it (checkpoint stays)
            from pipeline.control.actor import stop_controller

            stop_controller(controller["name"], controller["namespace"])
        if started:
            ray_session.shutdown()
    sink.write_json(cfg.output.url, sink.SUMMARY, summary)
    return summary


def audit_fraction(c, calibration: dict | None, bulk_rows: int, total_rows: int, constraint: float) -> float:
    """The audit's rate: enough bulk rows that the certificate's lower end clears the promise when the
    output disagrees at what calibration measured, plus a quarter of the way to its bound (the estimate of
    the boldest point that passed is optimistic; planning at the bound itself oversizes the audit ~2x)."""
    from pipeline.control.stats import rows_to_certify

    if c.audit_fraction is not None:
        return c.audit_fraction
    if bulk_rows <= 0:
        return c.max_audit_fraction
    if calibration is None:  # nothing measured: plan for half the budget
        rate = constraint / 2
    else:
        rate = calibration["test_disagreement"] + (calibration["upper_bound"] - calibration["test_disagreement"]) / 4
    # The interval covers the bulk's disagreements, spread over every answered row (calibration's agree).
    budget = constraint * total_rows / bulk_rows
    # x1.25: the audit's size is itself random (Bernoulli), and a count just at the need fails half the time
    need = 1.25 * rows_to_certify(rate, budget, c.confidence)
    return float(min(c.max_audit_fraction, max(c.min_audit_fraction, need / bulk_rows)))


def _certificate(cfg: JobConfig, summaries: list[dict], finished: set[int], constraint: float, calibration,
                 certify: dict | None, summary: dict) -> dict:
    """The certificate from this run's parts and, on --resume, the finished parts' stored counts."""
    from pipeline.offline.certificate import certify as certify_parts

    parts = [json.loads(r["part_stats"]) for r in summaries if r.get("part_stats")]
    parts += sink.part_stats(cfg.output.url, finished)
    cert = certify_parts(parts, constraint, cfg.certify.confidence)
    cert["audit_fraction"] = None if certify is None else round(certify["audit_fraction"], 4)
    if calibration is not None:
        cert["calibration_report"] = calibration.report
    # What the promise cost: the calibration pass's share of the job's time, and the share of layer work
    # spent running audit and feedback rows past their answer, with the bulk pass's time it stands for (an
    # estimate: a layer costs about the same for every row of a batch).
    run = sum(sum(r["layer_rows"]) for r in summaries)
    answers = sum(r["bulk_answer_layers"] for r in summaries)
    total = summary.get("seconds_total")
    feedback = (run - answers) / run if run else None
    cert["cost"] = {
        "calibration_seconds": None if calibration is None else round(calibration.seconds, 2),
        "calibration_share_of_job_time": (None if calibration is None or not total
                                          else round(calibration.seconds / total, 4)),
        "feedback_share_of_bulk_layer_work": None if feedback is None else round(feedback, 4),
        "feedback_share_of_job_time_estimated": (None if feedback is None or not total
                                                 else round(feedback * summary["seconds"] / total, 4)),
    }
    return cert


def _top_up(cfg: JobConfig, shards, cert: dict, constraint: float, summary: dict, echo) -> dict:
    """A fresh audit when the job's own was too small to tell; the new certificate keeps the old one's
    calibration and cost, and the looks before it."""
    from pipeline.offline.certificate import describe
    from pipeline.offline.repair import top_up

    t = time.perf_counter()
    new = top_up(cfg, shards, cert, constraint, int(summary["layers"]), echo)
    if new is None:  # the CLI says what the certificate says; no second line for a top-up not made
        return cert
    echo(f"before the top-up: {describe(cert)}")
    keep = ("audit_fraction", "calibration_report", "cost")
    looks = [{k: cert.get(k) for k in ("method", "agreement", "interval", "certified", "audit_early",
                                        "audit_early_disagree")}]
    new = {**new, **{k: cert[k] for k in keep if k in cert}, "earlier_looks": looks}
    new["cost"] = {**new.get("cost", {}), "top_up_seconds": round(time.perf_counter() - t, 2)}
    return new


def repair_job(cfg: JobConfig, parts: list[int] | str | None = None, address: str | None = None,
               echo=print) -> dict:
    """`offramp run --repair`: re-run the early-exit rows of the parts a job's certificate names (or `parts`)
    through the original model, top up the audit of the rest, and rewrite the summary."""
    import ray

    from pipeline.data import storage
    from pipeline.model.artifact import read_manifest
    from pipeline.offline.repair import repair
    from pipeline.offline.shards import Shard

    storage.configure(cfg.storage)
    summary = sink.read_json(cfg.output.url, sink.SUMMARY)
    plan = sink.read_json(cfg.output.url, sink.PLAN)
    if summary is None or plan is None or "certificate" not in summary:
        raise JobError(f"--repair: {cfg.output.url!r} holds no finished certified job (no summary with a "
                       "certificate); run the job first, or --resume it")
    manifest = read_manifest(cfg.model)
    shards = [Shard(**s) for s in plan["shards"]]
    started = _init_ray(cfg, address)
    t = time.perf_counter()
    try:
        cert = repair(cfg, shards, summary["certificate"], controller_constraint(manifest), manifest.num_layers,
                      parts, echo)
    finally:
        if started:
            ray_session.shutdown()
    old = summary["certificate"]
    summary["certificate"] = {**cert, "repaired": True, "repair_seconds": round(time.perf_counter() - t, 2),
                              "earlier_looks": old.get("earlier_looks", []) + [
                                  {k: old.get(k) for k in ("method", "agreement", "interval", "certified")}]}
    sink.write_json(cfg.output.url, sink.SUMMARY, summary)
    return summary


def _model_ref(model: str) -> str:
    """The model as workers on any node name it: a URL as it is (each node fetches it), a path made absolute."""
    return model if "://" in model else os.path.abspath(model)


def _run_pipeline(cfg: JobConfig, todo, controller, certify: dict | None = None) -> list[dict]:
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.offline.worker import EarlyExitWorker, tokenize_shards

    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = cfg.actors.wait_for_actors_s
    a = cfg.actors
    engine = cfg.engine.model_dump()
    ctl = None if controller is None else {k: v for k, v in controller.items() if k != "handle"}
    ds = ray.data.from_items([s.to_dict() for s in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        tokenize_shards, batch_size=1, batch_format="pyarrow", num_cpus=a.tokenize_cpus,
        fn_kwargs=dict(model=_model_ref(cfg.model),
                       text_column=cfg.input.text_column, id_column=cfg.input.id_column,
                       passthrough=cfg.input.passthrough, max_length=cfg.engine.max_length),
    )
    ds = ds.map_batches(
        # Ray Data needs a batch size for GPU actors; a shard cut across batches becomes several parts.
        EarlyExitWorker, batch_size=cfg.input.rows_per_shard if a.num_gpus else None, batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=a.min_actors, max_size=a.max_actors),
        num_cpus=a.num_cpus, num_gpus=a.num_gpus or None, resources=a.resources or None,
        # Ray Data's actor pools default to max_restarts=-1, max_task_retries=-1: a killed actor restarts
        # and its batch is retried; parts are atomic with deterministic names, so no duplicates.
        fn_constructor_kwargs=dict(model=_model_ref(cfg.model),
                                   engine=engine, output_url=cfg.output.url, passthrough=cfg.input.passthrough,
                                   controller=ctl, certify=certify),
    )
    t = time.perf_counter()
    try:
        rows = ds.take_all()
    except Exception as e:  # noqa: BLE001 - translate the usual resource failure into advice
        text = str(e)
        if "actors" in text.lower() and ("timed out" in text.lower() or "wait" in text.lower()):
            raise JobError(
                f"could not start {a.min_actors} early-exit actor(s) with num_gpus={a.num_gpus}, "
                f"num_cpus={a.num_cpus} within {a.wait_for_actors_s:.0f} s (cluster resources: "
                f"{ray.cluster_resources()}); lower actors.min_actors / num_gpus or add nodes"
            ) from e
        raise
    elapsed = time.perf_counter() - t
    for r in rows:
        r["_elapsed"] = elapsed
    return rows


def _summarize(cfg: JobConfig, shards, finished, rows: list[dict], controller, manifest) -> dict:
    import numpy as np

    L = manifest.num_layers
    exits = np.zeros(L + 1, np.int64)
    for r in rows:
        exits += np.asarray(r["exits"], np.int64)
    n = int(sum(r["rows"] for r in rows))
    elapsed = rows[0]["_elapsed"] if rows else 0.0
    shadow = int(sum(r["shadow_rows"] for r in rows))
    agree = int(sum(r["shadow_agree"] for r in rows))
    answered = int(exits[1:].sum())
    budgets = [int(r["token_budget"]) for r in rows]
    calibrated = sum(json.loads(r["part_stats"])["calibration"] for r in rows if r.get("part_stats"))
    kinds: Counter = Counter()
    for r in rows:
        kinds.update(json.loads(r["errors_by_kind"]))
    per_worker: dict[str, int] = {}
    busy: dict[str, float] = {}  # seconds each actor spent classifying (the rest: start-up, waiting for input)
    for r in rows:
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
        "layer_compute_saved_actual": (round(1 - float(sum(sum(r["layer_rows"]) for r in rows) + calibrated * L)
                                             / (answered * L), 4) if answered else None),
        "shadow_rows": shadow,
        "shadow_agreement": round(agree / shadow, 4) if shadow else None,
        "threshold_versions_seen": sorted({int(r["policy_version"]) for r in rows}),
        # a compression without fast kernels on a node's device is skipped there (EngineConfig.slow_compression)
        "compression_per_worker": {r["worker"]: r["compression"] for r in rows},
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
