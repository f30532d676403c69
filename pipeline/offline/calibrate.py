"""Calibration of an offline job on its own corpus, before the bulk pass.

A uniform random sample of the job's rows (across every shard) runs through the whole model with every
ramp recorded, in a few Ray tasks placed like the early-exit actors. Their answers are the original head's:
they go into the output as they are (the bulk pass skips them), so nothing is computed twice. Their ramp
records certify the thresholds the bulk pass starts from (pipeline.control.calibration). The sample and its
answers are kept in the output (`_offramp_calibration.parquet`), so `--resume` calibrates once.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.data.readers import row_errors
from pipeline.offline.shards import Shard, read_shard, row_ids

log = logging.getLogger(__name__)

FILE = "_offramp_calibration.parquet"
ANSWER_COLUMNS = ("id", "label", "label_id", "score", "exit_layer", "truncated", "error")


def sample_rows(shards: list[Shard], n: int, seed: int = 0) -> dict[int, np.ndarray]:
    """shard -> sorted positions within it of `n` rows drawn uniformly without replacement from all rows."""
    sizes = np.array([s.rows for s in shards], np.int64)
    total = int(sizes.sum())
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    return {int(shards[k].shard): picks[which == k] - starts[k] for k in np.unique(which)}


def run_full_depth(model: str, engine: dict, text_column: str, id_column: str | None,
                   items: list[tuple[dict, list[int]]]) -> pa.Table:
    """Rows of some shards through the whole model, every ramp recorded: one output row per input row with
    the original head's answer, plus its ramp record (`conf`, `pred`: one entry per ramp, empty for an
    error row; `final`: the head's label id)."""
    from pipeline.config import EngineConfig
    from pipeline.engine.policy import ExitPolicy
    from pipeline.engine.predictor import Predictor

    logging.getLogger("torchao").setLevel(logging.ERROR)
    predictor = Predictor(model, EngineConfig(**engine))
    R = predictor.num_ramps
    predictor.set_policy(ExitPolicy(np.ones(R), predictor.policy.active, 0))  # every ramp closed
    cols: dict[str, list] = {k: [] for k in ("shard", "row", *ANSWER_COLUMNS, "conf", "pred", "final")}
    for shard_dict, rows in items:
        shard = Shard(**shard_dict)
        table = read_shard(shard, text_column)
        texts = [table.column(text_column)[int(r)].as_py() for r in rows]
        ids = row_ids(table, shard, id_column, rows)
        enc = predictor.encoder.encode(texts)
        read = row_errors(table)  # a line that is no row: its reading error wins, as in tokenize_shards
        enc.errors = [read[int(r)] or e for r, e in zip(rows, enc.errors)]
        out = predictor.predict_encoded(enc, [f"{shard.shard}:{r}" for r in rows], shadow=np.ones(len(rows), bool))
        fb = {int(i): k for k, i in enumerate(out.feedback_rows.tolist())}
        for i, p in enumerate(out.predictions):
            k = fb.get(i)
            cols["shard"].append(shard.shard)
            cols["row"].append(int(rows[i]))
            cols["id"].append(ids[i])
            cols["label"].append(p.label)
            cols["label_id"].append(p.label_id)
            cols["score"].append(p.score)
            cols["exit_layer"].append(p.exit_layer)
            cols["truncated"].append(p.truncated)
            cols["error"].append(p.error)
            cols["conf"].append([] if k is None else out.feedback.conf[k].tolist())
            cols["pred"].append([] if k is None else out.feedback.pred[k].tolist())
            cols["final"].append(-1 if k is None else int(out.feedback.final[k]))
    return pa.table({
        **{k: cols[k] for k in ("shard", "row", "id", "label")},
        "label_id": pa.array(cols["label_id"], pa.int32()),
        "score": pa.array(cols["score"], pa.float32()),
        "exit_layer": pa.array(cols["exit_layer"], pa.int16()),
        "truncated": cols["truncated"],
        "error": pa.array(cols["error"], pa.string()),
        "conf": pa.array(cols["conf"], pa.list_(pa.float32())),
        "pred": pa.array(cols["pred"], pa.list_(pa.int64())),
        "final": pa.array(cols["final"], pa.int64()),
    })


def run_sample(cfg, shards: list[Shard], sample: dict[int, np.ndarray], tasks: int) -> pa.Table:
    """The sampled rows through the whole model in `tasks` Ray tasks with the actors' resources."""
    import ray

    by_id = {s.shard: s for s in shards}
    items = [(by_id[k].to_dict(), rows.tolist()) for k, rows in sorted(sample.items())]
    # Balance the tasks by rows, keeping each shard's rows together (one read per shard).
    groups: list[list] = [[] for _ in range(max(1, min(tasks, len(items))))]
    load = [0] * len(groups)
    for item in sorted(items, key=lambda it: -len(it[1])):
        g = load.index(min(load))
        groups[g].append(item)
        load[g] += len(item[1])
    a = cfg.actors
    remote = ray.remote(run_full_depth).options(num_cpus=a.num_cpus, num_gpus=a.num_gpus or None, max_retries=2)
    engine = cfg.engine.model_dump()
    refs = [remote.remote(cfg.model, engine, cfg.input.text_column, cfg.input.id_column, g) for g in groups if g]
    return pa.concat_tables(ray.get(refs))


@dataclass
class JobCalibration:
    """What the bulk pass needs from calibration, and what the summary reports of it."""

    answers: dict[int, dict[int, tuple]]
    """shard -> position -> the row's output values (ANSWER_COLUMNS): final answers, skipped by the bulk pass."""
    thresholds: list[float]
    report: dict
    seconds: float
    rows: int


def answers_by_shard(table: pa.Table) -> dict[int, dict[int, tuple]]:
    out: dict[int, dict[int, tuple]] = {}
    cols = [table.column(c).to_pylist() for c in ("shard", "row", *ANSWER_COLUMNS)]
    for shard, row, *values in zip(*cols):
        out.setdefault(int(shard), {})[int(row)] = tuple(values)
    return out


def feedback_of(table: pa.Table, num_ramps: int):
    """The sample's ramp records as a FeedbackWindow (error rows left out)."""
    from pipeline.feedback import FeedbackWindow

    final = np.asarray(table.column("final").to_pylist(), np.int64)
    keep = np.flatnonzero(final >= 0)
    conf = table.column("conf").to_pylist()
    pred = table.column("pred").to_pylist()
    return FeedbackWindow(
        np.asarray([conf[i] for i in keep], np.float32).reshape(len(keep), num_ramps),
        np.asarray([pred[i] for i in keep], np.int64).reshape(len(keep), num_ramps),
        final[keep],
    )


def calibrate_job(cfg, shards: list[Shard], manifest, constraint: float, echo=print) -> JobCalibration:
    """Draw (or, on --resume, reload) the calibration sample, run it, certify thresholds on it."""
    from pipeline.control.calibration import bulk_budget, calibrate_sample, calibration_rows
    from pipeline.control.deployment import cost_model, warm_start_window
    from pipeline.offline import sink

    c = cfg.certify
    t = time.perf_counter()
    total = sum(s.rows for s in shards)
    delta = 1 - c.confidence
    wanted = c.calibration_rows or calibration_rows(constraint, delta)
    n = min(wanted, int(c.max_calibration_share * total))
    table = sink.read_table(cfg.output.url, FILE) if cfg.resume else None
    if table is None:
        echo(f"calibrating on {n} rows drawn uniformly from all {total} ({n / total:.1%}; {wanted} wanted for a "
             f"{constraint:.2%} budget at {c.confidence:.0%} confidence), every ramp recorded")
        sample = sample_rows(shards, n, c.seed)
        table = run_sample(cfg, shards, sample, cfg.actors.max_actors)
        sink.write_table(cfg.output.url, FILE, table)
    else:
        echo(f"calibration sample of {table.num_rows} rows reloaded from the output (--resume)")
    budget = bulk_budget(constraint, total, table.num_rows)
    cal = calibrate_sample(feedback_of(table, len(manifest.ramps)), warm_start_window(cfg.model, manifest),
                           cost_model(manifest), budget, delta, manifest.active, c.seed)
    seconds = time.perf_counter() - t
    report = {**cal.to_dict(), "promise_constraint": constraint, "rows": table.num_rows, "rows_wanted": wanted,
              "seconds": round(seconds, 2)}
    echo(f"calibration: thresholds {[round(x, 4) for x in cal.thresholds.tolist()]} certified "
         f"(test split: {cal.test_disagreements}/{cal.test_rows} disagreements, upper bound {cal.upper_bound:.2%} "
         f"<= {budget:.2%}, the bulk's share of the {constraint:.2%} budget; estimated layer compute saved "
         f"{cal.test_layer_savings:.1%}) in {seconds:.1f} s"
         if cal.chosen >= 0 else
         f"calibration: no threshold set could be certified on {cal.test_rows} test rows: every ramp stays closed")
    return JobCalibration(answers_by_shard(table), [float(x) for x in cal.thresholds], report, seconds,
                          table.num_rows)
