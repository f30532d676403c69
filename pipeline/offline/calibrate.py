"""Calibration of an offline job on its own corpus, inside its actor pool.

A uniform random sample of the job's rows (across every shard) enters the actor pool first, as calibration
items: the actors run them through the whole model with every ramp recorded, and answer each with the float
original (the model itself, or for a compressed artifact or a float16 / bfloat16 engine its float32 original,
`Predictor(reference=True)`). Each item's record lands in the output (`_offramp_calibration/`); the actor that
writes the last one certifies thresholds on the whole sample (pipeline.control.calibration), hands them to the
controller, and publishes the decision (`_offramp_calibration.parquet`: the sample, its records and answers;
`_offramp_calibrated.json`: thresholds, audit rate, which model answers the bulk, the evidence). Every actor looks
for it between chunks of rows: rows reached before it are answered by the float original in full (exact, no
thresholds needed yet); later rows run at the certified thresholds and take the sample's answers for its rows.
One model load per actor, no round trip through the driver, and `--resume` calibrates once.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline.data.readers import row_errors
from pipeline.offline.certificate import OWN_HEAD, half_error
from pipeline.offline.shards import Shard, read_shard, row_ids

log = logging.getLogger(__name__)

FILE = "_offramp_calibration.parquet"
DECISION = "_offramp_calibrated.json"
ANSWER_COLUMNS = ("id", "label", "label_id", "score", "exit_layer", "truncated", "error")
VALUE_COLUMNS = (*ANSWER_COLUMNS, "logits")
TIMES = b"offramp.calibration_seconds"
"""A calibration row's values as the worker writes them: its output columns, then its head-space logits."""


def sample_rows(shards: list[Shard], n: int, seed: int = 0) -> dict[int, np.ndarray]:
    """shard -> sorted positions within it of `n` rows drawn uniformly without replacement from all rows."""
    sizes = np.array([s.rows for s in shards], np.int64)
    total = int(sizes.sum())
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    which = np.searchsorted(starts, picks, side="right") - 1
    return {int(shards[k].shard): picks[which == k] - starts[k] for k in np.unique(which)}


def record_table(shards: list[int], positions: list[int], ids: list, out) -> pa.Table:
    """`Predictor.record_encoded`'s output for rows at `positions` of `shards` as the calibration table: one row
    per input row with the float original's answer (ANSWER_COLUMNS, then its head-space `logits`) and the running
    model's ramp record (`conf`, `pred`: one entry per ramp, empty for an error row; `final`: its own head's answer
    id, -1 for an error row); when the running model is not the float original, the original's own ramp record
    too (`conf_original`, `pred_original`). The schema's metadata keeps the seconds each model took."""
    fb = {int(i): k for k, i in enumerate(out.feedback_rows.tolist())}
    orig = out.original
    cols: dict[str, list] = {k: [] for k in ("conf", "pred", "final", "conf_original", "pred_original")}
    for i in range(len(positions)):
        k = fb.get(i)
        cols["conf"].append([] if k is None else out.feedback.conf[k].tolist())
        cols["pred"].append([] if k is None else out.feedback.pred[k].tolist())
        cols["final"].append(-1 if k is None else int(out.feedback.final[k]))
        cols["conf_original"].append([] if k is None or orig is None else orig.conf[k].tolist())
        cols["pred_original"].append([] if k is None or orig is None else orig.pred[k].tolist())
    p = out.predictions
    table = pa.table({
        "shard": pa.array(shards, pa.int64()),
        "row": pa.array(positions, pa.int64()),
        "id": pa.array(ids, pa.string()),
        "label": pa.array([x.label for x in p], pa.string()),
        "label_id": pa.array([x.label_id for x in p], pa.int64()),
        "score": pa.array([x.score for x in p], pa.float32()),
        "exit_layer": pa.array([x.exit_layer for x in p], pa.int16()),
        "truncated": pa.array([x.truncated for x in p], pa.bool_()),
        "error": pa.array([x.error for x in p], pa.string()),
        "conf": pa.array(cols["conf"], pa.list_(pa.float32())),
        "pred": pa.array(cols["pred"], pa.list_(pa.int64())),
        "final": pa.array(cols["final"], pa.int64()),
        "conf_original": pa.array(cols["conf_original"], pa.list_(pa.float32())),
        "pred_original": pa.array(cols["pred_original"], pa.list_(pa.int64())),
        "logits": pa.array([None if x.logits is None else x.logits.tolist() for x in p], pa.list_(pa.float32())),
    })
    seconds = {"model_seconds": out.stats.get("model_seconds", 0.0),
               "reference_seconds": out.stats.get("reference_seconds", 0.0)}
    return table.replace_schema_metadata({TIMES: json.dumps(seconds)})


def seconds_of(tables: list[pa.Table]) -> dict[str, float]:
    """The seconds each model spent on these calibration tables (record_table's metadata), summed."""
    total = {"model_seconds": 0.0, "reference_seconds": 0.0}
    for t in tables:
        for k, v in json.loads((t.schema.metadata or {}).get(TIMES, b"{}") or "{}").items():
            total[k] = total.get(k, 0.0) + float(v)
    return total


def concat_records(tables: list[pa.Table]) -> pa.Table:
    """`record_table`s as one table, the seconds each model took summed (concat_tables keeps the first table's
    metadata alone: the speed a job's calibration compares candidates by was one piece's)."""
    return pa.concat_tables(tables).replace_schema_metadata({TIMES: json.dumps(seconds_of(tables))})


def run_full_depth(model: str, engine: dict, text_column: str, id_column: str | None,
                   items: list[tuple[dict, list[int]]]) -> pa.Table:
    """Rows of some shards through the whole model, every ramp recorded, each answered by the float original
    (`record_table`): a Ray task's work when `--repair` or a top-up re-runs rows of a finished job."""
    from pipeline.config import EngineConfig
    from pipeline.engine.predictor import Predictor

    logging.getLogger("torchao").setLevel(logging.ERROR)
    predictor = Predictor(model, EngineConfig(**engine), reference=True)
    tables = []
    for shard_dict, rows in items:
        shard = Shard(**shard_dict)
        table = read_shard(shard, text_column)
        texts = [table.column(text_column)[int(r)].as_py() for r in rows]
        enc = predictor.encoder.encode(texts)
        read = row_errors(table)  # a line that is no row: its reading error wins, as in tokenize_shards
        enc.errors = [read[int(r)] or e for r, e in zip(rows, enc.errors)]
        out = predictor.record_encoded(enc, [f"{shard.shard}:{r}" for r in rows])
        tables.append(record_table([shard.shard] * len(rows), [int(r) for r in rows], row_ids(table, shard, id_column, rows),
                                   out))
    return concat_records(tables)


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
    return concat_records(ray.get(refs))


def answers_by_shard(table: pa.Table) -> dict[int, dict[int, tuple]]:
    """shard -> position -> the row's values (VALUE_COLUMNS)."""
    out: dict[int, dict[int, tuple]] = {}
    cols = [table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows
            for c in ("shard", "row", *VALUE_COLUMNS)]
    for shard, row, *values in zip(*cols):
        out.setdefault(int(shard), {})[int(row)] = tuple(values)
    return out


def feedback_of(table: pa.Table, num_ramps: int, original: bool = False):
    """The sample's ramp records as a FeedbackWindow (error rows left out), its reference the float original's
    answers (the rows' answers): for a model that is not the original, its own head can disagree. `original`: the
    float original's own records instead (None when the running model was the original)."""
    from pipeline.feedback import FeedbackWindow

    final = np.asarray(table.column("final").to_pylist(), np.int64)
    keep = np.flatnonzero(final >= 0)
    answers = np.asarray(table.column("label_id").to_pylist(), np.int64)[keep]
    suffix = "_original" if original else ""
    if original and ("conf_original" not in table.column_names or
                     not any(len(x) for x in table.column("conf_original").to_pylist())):
        return None
    conf = table.column("conf" + suffix).to_pylist()
    pred = table.column("pred" + suffix).to_pylist()
    window = FeedbackWindow(
        np.asarray([conf[i] for i in keep], np.float32).reshape(len(keep), num_ramps),
        np.asarray([pred[i] for i in keep], np.int64).reshape(len(keep), num_ramps),
        answers if original else final[keep],
        reference=None if original else answers,
    )
    return window


@dataclass
class JobCalibration:
    """The calibration's decision for the bulk pass, and what the summary reports of it."""

    thresholds: list[float]
    audit_fraction: float
    answer_with: str
    """"model": the running model answers the bulk; "original": the float original does (calibration found it
    quicker under the promise, or nothing could be certified for a compressed model whose own head disagrees)."""
    report: dict
    rows: int
    audit_against: str = "float original"
    """What the bulk's audit compares the answers with: "float original", or "own head" (the running model's own
    head, no second model: the certificate adds its head's disagreement with the original, bounded on the
    calibration sample, `report["head"]`)."""
    seconds: float = 0.0
    """Wall time from the job's start until the decision was published."""
    answers: dict[int, dict[int, tuple]] = field(default_factory=dict)

    def decision(self) -> dict:
        """What the actors read (`DECISION`), and the driver reports."""
        return {"thresholds": self.thresholds, "audit_fraction": self.audit_fraction,
                "answer_with": self.answer_with, "audit_against": self.audit_against, "rows": self.rows,
                "report": self.report, "decided_at": time.time()}

    @classmethod
    def from_decision(cls, d: dict) -> "JobCalibration":
        return cls(d["thresholds"], d["audit_fraction"], d["answer_with"], d.get("report") or {}, d["rows"],
                   d.get("audit_against", "float original"))

    @property
    def head(self) -> dict | None:
        """The running model's head against the float original on the calibration sample, when the bulk's audit
        compares with that head (the certificate's second term), else None."""
        return self.report.get("head") if self.audit_against == OWN_HEAD else None

    def describe(self) -> str:
        """One line: which model answers the bulk and what was certified on the sample."""
        r = self.report
        if not r:
            return f"certify.calibrate off: the thresholds {self.thresholds} as they are, audited"
        who = "the float original" if self.answer_with == "original" else "the running model"
        why = ""
        if len(r.get("candidates", [])) > 1:
            est = {e["candidate"]: e for e in r["candidates"]}["model"]
            why = (f" (the running model's own head disagreed with the float original on "
                   f"{est['head_disagreement']:.2%} of the tune rows, at {est['speed']:.2f}x the original's time per "
                   f"row)")
        if self.head is not None:
            h = self.head
            why += (f", its exits audited against its own head (no second model): the head's disagreement with the "
                    f"float original is bounded apart, {h['disagreements']}/{h['rows']} on the sample, at most "
                    f"{h['upper_rows']} rows of the job")
        if r["chosen"] >= 0:
            return (f"calibration: {who} answers the bulk{why}; thresholds {[round(x, 4) for x in self.thresholds]} "
                    f"certified on {self.rows} rows (test split: {round(r['test_disagreement'] * r['test_rows'])}/"
                    f"{r['test_rows']} disagreements with the float original, upper bound {r['upper_bound']:.2%} <= "
                    f"{r['constraint']:.2%}, the bulk's share of the {r['promise_constraint']:.2%} promise; estimated "
                    f"layer compute saved {r['test_layer_savings']:.1%})")
        return (f"calibration: no threshold set could be certified on {r['test_rows']} test rows: {who} answers the "
                f"bulk{why}, every ramp closed")


AUDIT_POWER = 0.9
"""The chance the audit's interval clears the promise when the output disagrees at the rate planned for."""


def audit_fraction(c, calibration: dict | None, bulk_rows: int, total_rows: int, constraint: float,
                   head_rows: int | None = None) -> float:
    """The audit's rate: enough bulk rows that the certificate's lower end clears the promise when the
    output disagrees at what calibration measured, plus a quarter of the way to its bound (the estimate of
    the boldest point that passed is optimistic; planning at the bound itself oversizes the audit ~2x).
    `head_rows`: the audit compares with the running model's own head, whose disagreement with the float original
    takes up to this many rows of the budget (the certificate's two terms each at half its error)."""
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
    budget = (constraint * total_rows - (head_rows or 0)) / bulk_rows
    confidence = c.confidence if head_rows is None else half_error(c.confidence)
    # planned for the count's 90% quantile: at the count expected the interval misses half the time, and a miss
    # costs a top-up through the float original after the bulk (15-26 s on 50,000 rows), far more than the rows
    need = rows_to_certify(rate, budget, confidence, power=AUDIT_POWER)
    return float(min(c.max_audit_fraction, max(c.min_audit_fraction, need / bulk_rows)))


def decide(cfg, table: pa.Table | None, manifest, constraint: float, total: int) -> JobCalibration:
    """Which model answers the bulk and at which certified thresholds, from the calibration table (None:
    `certify.calibrate` off, the engine's thresholds are audited as they are), and the audit's size. `cfg`: the
    JobConfig. A running model that is not the float original competes with it (pipeline.control.calibration.
    calibrate_candidates): its own head's disagreement counts against the budget."""
    from pipeline.control.calibration import Candidate, bulk_budget, calibrate_candidates
    from pipeline.control.deployment import cost_model, warm_start_window
    from pipeline.feedback import FeedbackWindow

    c = cfg.certify
    if table is None:
        thresholds = cfg.engine.thresholds or list(manifest.thresholds)
        audit = audit_fraction(c, None, total, total, constraint)
        return JobCalibration([float(t) for t in thresholds], audit, "model", {}, 0)
    R, costs = len(manifest.ramps), cost_model(manifest)
    fb = feedback_of(table, R)
    candidates = [Candidate("model", fb, warm_start_window(cfg.model, manifest), costs)]
    original = feedback_of(table, R, original=True)
    bulk = total - table.num_rows
    head = None
    if original is not None:  # the running model is not the float original: the original is a candidate too
        times = seconds_of([table])
        candidates[0].speed = times["model_seconds"] / times["reference_seconds"] if times["reference_seconds"] else 1.0
        # the float original runs beside it on the audit and feedback rows: an audit planned at 3/4 of the budget
        # (the certified thresholds come close to it), feedback at least midway between its floor and ceiling
        near = {"test_disagreement": 0.75 * constraint, "upper_bound": 0.75 * constraint}
        candidates[0].overhead = max(audit_fraction(c, near, bulk, total, constraint),
                                     (c.feedback_min + c.feedback_max) / 2)
        candidates.append(Candidate("original", original, None, costs))
        # ... or the model alone, its exits audited against its own head, its head bounded on this sample
        head = head_evidence(fb, total, table.num_rows, c.confidence)
        own = FeedbackWindow(fb.conf, fb.pred, fb.final)
        candidates.append(Candidate(OWN_HEAD, own, candidates[0].warm, costs, candidates[0].speed,
                                    head_share=head["upper_rows"] / bulk if bulk > 0 else 1.0))
    budget = bulk_budget(constraint, total, table.num_rows)
    chosen, cal, estimates = calibrate_candidates(candidates, budget, 1 - c.confidence, manifest.active, c.seed)
    head_disagree = int((candidates[0].sample.final != candidates[0].sample.labels).sum())
    report = {**cal.to_dict(), "promise_constraint": constraint, "rows": table.num_rows, "answer_with": chosen.name,
              "head_disagreements": head_disagree, "candidates": estimates, **({"head": head} if head else {})}
    # Nothing certified for a model audited against the original while its head errs: the original answers,
    # every ramp closed. Every ramp closed under the own-head audit: its head answers, bounded on the sample.
    fallback = cal.chosen < 0 and head_disagree > 0 and chosen.name == "model"
    answer_with = "original" if fallback or chosen.name == "original" else "model"
    against = OWN_HEAD if chosen.name == OWN_HEAD else "float original"
    if fallback or (against == OWN_HEAD and cal.chosen < 0):
        audit = 0.0
    else:
        audit = audit_fraction(c, report, bulk, total, constraint, head["upper_rows"] if against == OWN_HEAD else None)
    return JobCalibration([float(x) for x in cal.thresholds], audit, answer_with, report, table.num_rows,
                          against, answers=answers_by_shard(table))


def head_evidence(fb, total_rows: int, sample_rows: int, confidence: float) -> dict:
    """The running model's own head against the float original on the calibration sample's answered rows (a
    uniform sample of the job's), and the most disagreements the job's other rows can hold (the upper end of the
    exact interval at half the certificate's error: the other half is the exits'). `fb`: feedback_of's window."""
    from pipeline.control.stats import hypergeom_count_interval

    n, k = len(fb), int((fb.final != fb.labels).sum())
    population = max(n, round(total_rows * n / sample_rows)) if sample_rows else n  # answered rows, as planned
    hi = hypergeom_count_interval(k, n, population, half_error(confidence))[1] if n else population
    return {"rows": n, "disagreements": k, "upper_rows": int(hi - k)}


def publish(output_url: str, calibration: JobCalibration, table: pa.Table | None) -> None:
    """The decision, where every actor reads it: the sample first, then the decision that points to it."""
    from pipeline.offline import sink

    if table is not None:
        sink.write_table(output_url, FILE, table)
    sink.write_json(output_url, DECISION, calibration.decision())


def read_published(output_url: str) -> tuple[dict, dict[int, dict[int, tuple]]] | None:
    """(decision, shard -> position -> answer values) once published, else None."""
    from pipeline.offline import sink

    decision = sink.read_json(output_url, DECISION)
    if decision is None:
        return None
    table = sink.read_table(output_url, FILE) if decision.get("rows") else None
    return decision, ({} if table is None else answers_by_shard(table))


def calibration_items(shards: list[Shard], sample: dict[int, np.ndarray], groups: int) -> list[dict]:
    """The sampled rows as about `groups` actor-pool items of equal rows, consecutive shards' rows together: each
    item is one batch through each model, and a shard's ~30 sampled rows a batch ran both models 1.4x slower per
    row than 1,500 rows together (one thread, in one process). An item: its first shard's fields, and `group` (JSON:
    each shard's fields and `positions`). The job keeps the items ahead of every shard (`preserve_order`): a group
    is read in one tokenize task, and unordered it reached the actors after shards' items, whose rows the float
    original then answered in full before the decision."""
    by_id = {s.shard: s for s in shards}
    total = sum(len(v) for v in sample.values())
    groups = max(1, groups)
    items: list[dict] = []
    group: list[dict] = []
    done = 0
    for k, v in sorted(sample.items()):
        group.append({**by_id[k].to_dict(), "positions": v.tolist()})
        done += len(v)
        if done * groups >= (len(items) + 1) * total:  # past the next of `groups` equal cuts
            items.append({**by_id[group[0]["shard"]].to_dict(), "positions": None, "group": json.dumps(group)})
            group = []
    return items


ITEMS = "_offramp_calibration"
"""Where the calibration items' records land until the sample is whole (`ITEMS/part-SSSSSS-RRRRRRRRR-NNNNNN.parquet`:
the first shard and row of a piece, how many rows: a batch of GPU actors can cut an item, and each piece lands)."""


def write_item(output_url: str, table: pa.Table) -> None:
    from pipeline.offline import sink

    shard, row = min(zip(table.column("shard").to_pylist(), table.column("row").to_pylist()))
    sink.write_table(output_url, f"{ITEMS}/part-{shard:06d}-{row:09d}-{table.num_rows:06d}.parquet", table)


def whole_sample(output_url: str, rows: int) -> pa.Table | None:
    """The calibration sample once all its `rows` are in the output, else None."""
    from pipeline.offline import sink

    fs, root = sink.filesystem(output_url)
    folder = f"{root.rstrip('/')}/{ITEMS}"
    fs.invalidate_cache(folder)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)) if fs.exists(folder) else []
    if sum(int(name.removesuffix(".parquet").rsplit("-", 1)[1]) for name in names) < rows:
        return None
    table = concat_records([sink.read_table(output_url, f"{ITEMS}/{name}") for name in names])
    # a retried batch cut differently can land overlapping pieces: keep each row once, and decide on all of them
    seen, keep = set(), []
    for i, key in enumerate(zip(table.column("shard").to_pylist(), table.column("row").to_pylist())):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) < rows:
        return None
    return table if len(keep) == table.num_rows else table.take(pa.array(keep, pa.int64()))


def decide_when_whole(output_url: str, job: dict, rows: int, controller) -> JobCalibration | None:
    """An actor's step after writing a calibration item: when the sample is whole, certify on it, hand the
    thresholds to the controller (a ControllerClient, or None), and publish (every actor that finds the sample
    whole decides the same: the decision is a function of the sample and the job)."""
    from pipeline.config import JobConfig
    from pipeline.model.artifact import read_manifest

    table = whole_sample(output_url, rows)
    if table is None:
        return None
    cfg = JobConfig.model_validate(job["config"])
    decided = decide(cfg, table, read_manifest(cfg.model), job["constraint"], job["total_rows"])
    if controller is not None:
        controller.calibrate(decided.thresholds, decided.report)
    publish(output_url, decided, table)
    return decided
