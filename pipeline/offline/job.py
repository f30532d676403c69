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
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.control.deployment import ControllerMismatch, controller_constraint, own_controller_name, start_controller
from pipeline.data.readers import require_columns
from pipeline.offline import attempts, ray_session, sink
from pipeline.offline.job_summary import format_summary, output_exits, promise_cost, summarize, timeline  # noqa: F401
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


def promise_of(cfg: JobConfig, manifest) -> float:
    """The job's promise: `certify.constraint`, default the artifact's constraint. A `controller.tuning.constraint`
    set to another value fails here, before any model work: one job, one budget."""
    promise = cfg.certify.constraint if cfg.certify.constraint is not None else float(manifest.constraint)
    tuning = cfg.controller.tuning
    if "constraint" in tuning.model_fields_set and abs(tuning.constraint - promise) > 1e-12:
        where = "certify.constraint" if cfg.certify.constraint is not None else "the artifact's constraint"
        raise JobError(f"controller.tuning.constraint={tuning.constraint} differs from the job's promise, {where} "
                       f"({promise}): set the promise with certify.constraint alone (the controller guards it too)")
    return promise


def run_job(cfg: JobConfig, address: str | None = None, echo=print) -> dict:
    if cfg.input.url.startswith("builtin:"):
        cfg = cfg.model_copy(update={"input": cfg.input.model_copy(update={"url": materialize_builtin(cfg.input.url)})})
    manifest, shards, finished, plan = check_inputs(cfg)
    constraint = promise_of(cfg, manifest)
    todo = [s for s in shards if s.shard not in finished]
    sink.clean_temporaries(cfg.output.url)
    attempts.clear(cfg.output.url)
    sink.write_json(cfg.output.url, sink.PLAN, plan)
    total_rows = sum(s.rows for s in shards)
    echo(f"{cfg.name}: {total_rows} rows in {len(shards)} shards"
         + (f" ({len(finished)} already finished, resuming)" if finished else ""))
    ckpt = cfg.controller.checkpoint_url
    if ckpt and not cfg.resume and not cfg.controller.share:  # a fresh job's controller starts fresh, not from
        _remove_url(ckpt)                                     # an earlier job's state at the same URL

    t_ray = time.perf_counter()
    started = _init_ray(cfg, address)
    t0, t0_wall = time.perf_counter(), time.time()
    ray_start = t0 - t_ray
    controller = None
    try:
        c = cfg.certify
        plan_cal = _plan_calibration(cfg, shards, manifest, constraint, total_rows, echo) if c.enabled and todo else None
        try:
            controller = start_controller(cfg.model, manifest, cfg.controller, thresholds=cfg.engine.thresholds,
                                          own_name=own_controller_name("job", cfg.name, uuid.uuid4().hex[:8]),
                                          constraint=_controller_budget(c, manifest, constraint, total_rows, plan_cal),
                                          defaults=None if not c.enabled else {
                                              "window_output_rows": c.window_output_rows,
                                              "guard_alpha": 1 - c.confidence,
                                              "feedback_min": c.feedback_min, "feedback_max": c.feedback_max},
                                          warm_start=not c.enabled)
        except ControllerMismatch as e:
            raise JobError(str(e)) from e
        calibration = None
        if plan_cal is not None and plan_cal["decided"] is not None:  # --resume, or certify.calibrate off
            calibration = _announce(cfg, plan_cal["decided"], plan_cal["table"], controller)
            echo(calibration.describe())
        items = plan_cal["items"] if plan_cal is not None and plan_cal["decided"] is None else []
        certify = None if not c.enabled else {
            "seed": c.seed, "sample_rows": plan_cal["rows"] if items else 0,
            "job": {"config": cfg.model_dump(mode="json"), "constraint": constraint, "total_rows": total_rows}}
        with _DecisionWatch(cfg.output.url, echo, t0) if items else nullcontext() as watch:
            summaries = _run_pipeline(cfg, items, todo, controller, certify) if todo else []
        if items:
            calibration = watch.decided or _published_calibration(cfg.output.url, t0)
            _clear_items(cfg.output.url)
        summary = summarize(cfg, shards, finished, summaries, controller, manifest)
        pipeline_done = time.time() - t0_wall
        if c.enabled:
            cert = _certificate(cfg, summaries, finished, constraint, calibration, summary)
            if not cert["certified"] and c.top_up:
                cert = _top_up(cfg, shards, cert, constraint, summary, echo)
                if cert.get("looks", 1) > 1:  # re-run rows carry the original's answers now: count the output as is
                    summary.update(output_exits(cfg.output.url, manifest.num_layers))
            summary["certificate"] = cert
        summary["seconds_total"] = round(time.perf_counter() - t0, 3)
        summary["timeline"] = timeline(summaries, t0_wall, ray_start, pipeline_done, calibration,
                                       summary["seconds_total"])
    finally:
        if controller is not None and not cfg.controller.share:  # the job's own: gone with it (checkpoint stays)
            from pipeline.control.actor import stop_controller

            stop_controller(controller["name"], controller["namespace"])
        if started:
            ray_session.shutdown()
    sink.write_json(cfg.output.url, sink.SUMMARY, summary)
    return summary


def _plan_calibration(cfg: JobConfig, shards, manifest, constraint: float, total_rows: int, echo) -> dict:
    """What the certified job calibrates on: {"items": calibration items for the actor pool, "rows": sample size,
    "decided": a JobCalibration already known (--resume: from the stored sample; `certify.calibrate` off: the
    engine's thresholds), "table": the stored sample}."""
    from pipeline.control.calibration import calibration_rows
    from pipeline.offline.calibrate import DECISION, FILE, calibration_items, decide, sample_rows

    c = cfg.certify
    if not c.calibrate:
        return {"items": [], "rows": 0, "decided": decide(cfg, None, manifest, constraint, total_rows),
                "table": None}
    table = sink.read_table(cfg.output.url, FILE) if cfg.resume else None
    if table is not None:
        echo(f"calibration sample of {table.num_rows} rows reloaded from the output (--resume)")
        return {"items": [], "rows": table.num_rows, "table": table,
                "decided": decide(cfg, table, manifest, constraint, total_rows)}
    sink.remove(cfg.output.url, DECISION)  # an older run's decision must not reach this run's actors
    wanted = c.calibration_rows or calibration_rows(constraint, 1 - c.confidence)
    n = min(wanted, int(c.max_calibration_share * total_rows))
    if n == 0:  # too few rows to calibrate on: the float original answers them all
        return {"items": [], "rows": 0, "decided": None, "table": None}
    echo(f"calibrating on {n} rows drawn uniformly from all {total_rows} ({n / total_rows:.1%}; {wanted} wanted for "
         f"a {constraint:.2%} promise at {c.confidence:.0%} confidence), run first by the actors, every ramp recorded;"
         " shards reached before the decision are answered by the float original")
    # two items per actor: batches large enough for both models, and an actor done early waits on one item at most
    items = calibration_items(shards, sample_rows(shards, n, c.seed), 2 * cfg.actors.max_actors)
    return {"items": items, "rows": n, "decided": None, "table": None}


def _controller_budget(c, manifest, constraint: float, total_rows: int, plan_cal: dict | None) -> float:
    """The disagreement the job's controller guards: the bulk's share of the promise when it calibrates (the
    calibration rows agree by construction), the promise when its feedback is measured against the float original
    (a certified job), else the promise less what compression lost on its check."""
    from pipeline.control.calibration import bulk_budget

    if plan_cal is not None and plan_cal["rows"]:
        return bulk_budget(constraint, total_rows, plan_cal["rows"])
    return controller_constraint(manifest, constraint, reference=c.enabled)


def _remove_url(url: str) -> None:
    from pipeline.data import storage

    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def _announce(cfg: JobConfig, decided, table, controller):
    """Hand a calibration decision known before the pipeline (--resume, `certify.calibrate` off) to the controller,
    then publish it to the actors (in that order: an actor that reads the decision finds the controller holding
    it)."""
    import ray

    from pipeline.offline.calibrate import publish

    if controller is not None:
        ray.get(controller["handle"].calibrate.remote(decided.thresholds, decided.report), timeout=60)
    publish(cfg.output.url, decided, table)
    return decided


def _published_calibration(output_url: str, t0: float):
    """The decision the actors published (None when the sample never came back whole)."""
    from pipeline.offline.calibrate import DECISION, JobCalibration

    d = sink.read_json(output_url, DECISION)
    if d is None:
        return None
    cal = JobCalibration.from_decision(d)
    cal.seconds = max(0.0, d["decided_at"] - (time.time() - (time.perf_counter() - t0)))
    return cal


def _clear_items(output_url: str) -> None:
    """The calibration items' records, once the whole sample is kept in one file (or the job is over)."""
    from pipeline.offline.calibrate import ITEMS

    fs, root = sink.filesystem(output_url)
    folder = f"{root.rstrip('/')}/{ITEMS}"
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


class _DecisionWatch:
    """While the pipeline runs: say the calibration decision when the actors publish it."""

    def __init__(self, output_url: str, echo, t0: float, every_s: float = 1.0):
        self.output_url, self.echo, self.t0, self.every_s = output_url, echo, t0, every_s
        self.decided = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="offramp-decision-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.decided = _published_calibration(self.output_url, self.t0)
            except Exception:  # noqa: BLE001 - a half-visible file on an object store: look again
                continue
            if self.decided is not None:
                self.echo(f"{self.decided.describe()} ({self.decided.seconds:.1f} s into the job)")
                return

    def __enter__(self) -> "_DecisionWatch":
        _clear_items(self.output_url)  # an older run's records must not complete this run's sample
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _certificate(cfg: JobConfig, summaries: list[dict], finished: set[int], constraint: float, calibration,
                 summary: dict) -> dict:
    """The certificate from this run's parts and, on --resume, the finished parts' stored counts."""
    from pipeline.offline.certificate import certify as certify_parts

    parts = [json.loads(r["part_stats"]) for r in summaries if r.get("part_stats")]
    parts += sink.part_stats(cfg.output.url, finished)
    cert = certify_parts(parts, constraint, cfg.certify.confidence, head=None if calibration is None else calibration.head)
    cert["audit_fraction"] = None if calibration is None else round(calibration.audit_fraction, 4)
    if calibration is not None and calibration.report:  # certify.calibrate off: the engine's thresholds, audited
        cert["calibration_report"] = calibration.report
        cert["answer_with"] = calibration.answer_with
    cert["cost"] = promise_cost(summaries, summary, calibration)
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
    keep = ("audit_fraction", "calibration_report", "answer_with", "cost")
    looks = [{k: cert.get(k) for k in ("method", "agreement", "interval", "certified", "audit_early",
                                        "audit_early_disagree")}]
    new = {**new, **{k: cert[k] for k in keep if k in cert}, "earlier_looks": looks}
    new["cost"] = {**new.get("cost", {}), "top_up_seconds": round(time.perf_counter() - t, 2)}
    return new


def repair_job(cfg: JobConfig, parts: list[int] | str | None = None, address: str | None = None,
               echo=print) -> dict:
    """`offramp run --repair`: re-run the early-exit rows of the parts a job's certificate names (or `parts`)
    through the original model, top up the audit of the rest, and rewrite the summary."""

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
        cert = repair(cfg, shards, summary["certificate"], float(summary["certificate"]["constraint"]),
                      manifest.num_layers, parts, echo)
    finally:
        if started:
            ray_session.shutdown()
    old = summary["certificate"]
    summary.update(output_exits(cfg.output.url, manifest.num_layers))
    summary["certificate"] = {**cert, "repaired": True, "repair_seconds": round(time.perf_counter() - t, 2),
                              "earlier_looks": old.get("earlier_looks", []) + [
                                  {k: old.get(k) for k in ("method", "agreement", "interval", "certified")}]}
    sink.write_json(cfg.output.url, sink.SUMMARY, summary)
    return summary


def _model_ref(model: str) -> str:
    """The model as workers on any node name it: a URL as it is (each node fetches it), a path made absolute."""
    return model if "://" in model else os.path.abspath(model)


def _run_pipeline(cfg: JobConfig, items: list[dict], todo, controller, certify: dict | None) -> list[dict]:
    """Stream the calibration `items`, then the `todo` shards, through tokenize tasks and the actor pool. Returns
    every item's summary row."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from pipeline.offline.worker import EarlyExitWorker, tokenize_shards

    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = cfg.actors.wait_for_actors_s
    a = cfg.actors
    engine = cfg.engine.model_dump()
    ctl = None if controller is None else {k: v for k, v in controller.items() if k != "handle"}
    # Calibration items first, kept first (a group is read in one tokenize task, slower than a shard's): the actors
    # take them before any shard, so most rows run at certified thresholds. (The context is the process's: put back.)
    order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = order or bool(items)
    work = items + [{**s.to_dict(), "positions": None} for s in todo]
    ds = ray.data.from_items(work, override_num_blocks=len(work))
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
                                   controller=ctl, certify=certify, output=cfg.output.model_dump(exclude={"url"})),
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
    finally:
        ctx.execution_options.preserve_order = order
    elapsed = time.perf_counter() - t
    for r in rows:
        r["_elapsed"] = elapsed
    return rows
