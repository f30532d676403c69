"""The two stages that run on the cluster: tokenize (stateless tasks) and infer (actor pool).

tokenize_shards: shard descriptors (and calibration items) -> rows with ids, token ids, per-row errors (Ray
tasks, CPU).
EarlyExitWorker: tokenized rows -> predictions written as the shard's part file; returns a one-row summary
per shard (rows, exits per layer, shadow agreement, thresholds version, worker). A calibration item's rows
are recorded instead (pipeline.offline.calibrate) and come back in its summary.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.readers import require_columns, row_errors
from pipeline.data.texts import error_kind
from pipeline.offline import attempts
from pipeline.offline.shards import Shard, read_shard, row_ids
from pipeline.offline.sink import write_part

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _encoder(model: str, max_length: int | None):
    from pipeline.engine.encoder import TextEncoder

    return TextEncoder.from_artifact(model, max_length)


def tokenize_shards(batch: pa.Table, model: str, text_column: str, id_column: str | None,
                    passthrough: list[str], max_length: int | None) -> pa.Table:
    """One output table for the item(s) in `batch`: a shard, or a calibration item (its `group` of shards'
    `positions` only). Bad rows keep their place with an error (a line that could not be read as a row, else the
    text's)."""
    out = []
    items = batch.to_pylist()
    parts = [part for item in items for part in (json.loads(item["group"]) if item.get("group") else [item])]
    for d in parts:
        shard = Shard(d["shard"], d["path"], d["start"], d["stop"])
        table = read_shard(shard, text_column)
        require_columns(table, [text_column, id_column, *passthrough], shard.path,
                        "every input file must have the job's input columns")
        calibration = d.get("positions") is not None
        rows = list(d["positions"]) if calibration else list(range(table.num_rows))
        ids = row_ids(table, shard, id_column, rows)
        if calibration:
            table = table.take(pa.array(rows, pa.int64()))
        texts = table.column(text_column).to_pylist()
        enc = _encoder(model, max_length).encode(texts)
        cols = {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(enc.input_ids, pa.list_(pa.int32())),
            "truncated": pa.array(enc.truncated),
            "error": pa.array([r or e for r, e in zip(row_errors(table), enc.errors)], pa.string()),
            "shard": pa.array([shard.shard] * len(texts), pa.int64()),
            "row": pa.array(rows, pa.int64()),
            "calibration": pa.array([calibration] * len(texts), pa.bool_()),
        }
        for c in passthrough:
            cols[c] = table.column(c)
        out.append(pa.table(cols))
    return pa.concat_tables(out)


class EarlyExitWorker:
    """Hosts one early-exit model; classifies whole shards and writes their parts.

    In a certified job (`certify`) the float original also runs on every feedback row when the model is not it
    (Predictor(reference=True)), so audit and feedback measure agreement with it, and calibration items are
    recorded (pipeline.offline.calibrate). Until the calibration decision is published, rows are answered by the
    float original in full; after, at the decided thresholds with a fixed-rate audit."""

    def __init__(self, model: str, engine: dict, output_url: str, passthrough: list[str],
                 controller: dict | None = None, certify: dict | None = None, output: dict | None = None):
        from pipeline.config import EngineConfig
        from pipeline.engine.predictor import Predictor

        logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load on CPU
        self.predictor = Predictor(model, EngineConfig(**engine), reference=certify is not None)
        log.info("worker warmed up in %.1f s", self.predictor.warm_up())  # a compiled model compiles now
        self.output_url = output_url
        self.passthrough = passthrough
        self.output = output or {}
        """OutputSpec fields: `probabilities` (a column per label), `filter` (which rows the parts keep)."""
        self.certify = certify
        """{"seed": the audit's hash seed, "sample_rows": how many rows the calibration items hold, "job": what deciding needs
        (pipeline.offline.calibrate.decide_when_whole)}. None: no promise, the engine's shadow_fraction feeds the
        controller."""
        self.chunk_rows = 128  # before the calibration decision, rows are answered a chunk at a time
        self.decision: dict | None = None  # the published calibration decision, once read
        self.known: dict[int, dict[int, tuple]] = {}  # its sample's answers: shard -> position -> values
        import ray

        # node id, not host name: several nodes can share one host (ray.cluster_utils.Cluster)
        self.worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
        self.client = None
        if controller:
            from pipeline.control.client import ControllerClient

            self.client = ControllerClient.for_policy(controller, self.predictor.policy)

    def _published(self) -> dict | None:
        """The calibration decision once it is published (read once, then kept)."""
        if self.certify is None or self.decision is not None:
            return self.decision
        from pipeline.engine.policy import ExitPolicy
        from pipeline.offline.calibrate import read_published
        from pipeline.offline.certificate import OWN_HEAD

        got = read_published(self.output_url)
        if got is None:
            return None
        self.decision, self.known = got
        if self.decision["answer_with"] == "original":
            self.predictor.use_original()
        elif self.decision.get("audit_against") == OWN_HEAD:  # audit rows run to the end of this model alone
            self.predictor.drop_reference()
        if self.client is not None:
            self.client.refresh()  # the controller was handed the thresholds before they were published
        if self.client is None or self.client.version <= self.predictor.policy.version:
            p = self.predictor.policy
            self.predictor.set_policy(ExitPolicy(self.decision["thresholds"], p.active, p.version + 1))
        return self.decision

    def _shadow(self, shard: int, positions: list[int], audit: float) -> tuple[np.ndarray | None, np.ndarray | None]:
        """([n] rows to run to the end, [n] the audit among them): the audit is a fixed-rate sample for the
        certificate, the rest the extra rows the controller asks for while its evidence is thin.
        (None, None): the engine's shadow_fraction, no audit."""
        from pipeline.engine.predictor import key_uniforms

        if self.certify is None:
            return None, None
        keys = [f"{shard}:{r}" for r in positions]
        seed = self.certify["seed"]
        extra = max(0.0, (self.client.feedback_fraction if self.client else 0.0) - audit)
        audited = key_uniforms(keys, f"audit{seed}") < audit
        return audited | (key_uniforms(keys, f"steer{seed}") < extra), audited

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        sample = batch.filter(batch.column("calibration"))  # calibration rows first (a GPU batch: with shards')
        if sample.num_rows:
            summaries.append(self._calibration(sample))
        bulk = batch.filter(pc.invert(batch.column("calibration")))
        for shard in sorted(set(bulk.column("shard").to_pylist())):
            summaries.append(self._shard(int(shard), bulk.filter(pc.equal(bulk.column("shard"), shard))))
        return pa.Table.from_pylist(summaries)

    def _encoded(self, rows: pa.Table):
        from pipeline.engine.encoder import Encoded

        return Encoded(
            [list(x) for x in rows.column("input_ids").to_numpy(zero_copy_only=False)],
            rows.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
            rows.column("error").to_pylist(),
        )

    def _calibration(self, rows: pa.Table) -> dict:
        """A batch's calibration rows (one item; a GPU batch may hold pieces of several): every row to the end,
        every ramp recorded, answered by the float original; the record lands in the output (no part: the shards'
        parts take these answers) and the last one in decides."""
        from pipeline.offline.calibrate import decide_when_whole, record_table, write_item

        t = time.perf_counter()
        shards, positions = rows.column("shard").to_pylist(), rows.column("row").to_pylist()
        out = self.predictor.record_encoded(self._encoded(rows), [f"{k}:{r}" for k, r in zip(shards, positions)])
        write_item(self.output_url, record_table(shards, positions, rows.column("id").to_pylist(), out))
        # The last item in decides for everyone (all that find the sample whole decide the same).
        decide_when_whole(self.output_url, self.certify["job"], self.certify["sample_rows"], self.client)
        piece = _Piece(list(range(len(positions))), out, None, time.perf_counter() - t, before=False)
        return self._summary(int(min(shards)), "calibration", [], [piece], None)

    def _shard(self, shard: int, rows: pa.Table) -> dict:
        L = self.predictor.model.num_layers
        positions = rows.column("row").to_pylist()
        attempts.mark(self.output_url, shard, int(min(positions)))
        ids = rows.column("id").to_pylist()
        values: list = [None] * len(positions)  # ANSWER_COLUMNS order, then the logits
        exact = np.zeros(len(positions), bool)  # answered by the float original
        pieces: list[_Piece] = []
        pending = list(range(len(positions)))
        while pending:
            t = time.perf_counter()
            decision = self._published()
            if self.certify is not None and decision is None:
                # Before the calibration decision: the float original answers, in full, a chunk at a time (the
                # decision is looked for again after each, so at most a chunk waits on it).
                take, pending = pending[:self.chunk_rows], pending[self.chunk_rows:]
                out = self.predictor.record_encoded(self._encoded(rows.take(pa.array(take, pa.int64()))),
                                                    [ids[i] for i in take])
                pieces.append(_Piece(take, out, None, time.perf_counter() - t, before=True))
                exact[take] = True
                continue
            if self.client is not None:
                self.client.refresh_policy(self.predictor)
            known = self.known.get(shard, {})
            for i in pending:
                if positions[i] in known:  # a calibration row: its answer is the float original's already
                    values[i], exact[i] = known[positions[i]], True
            take = [i for i in pending if values[i] is None]
            audit = (decision or {}).get("audit_fraction", 0.0)
            shadow, audited = self._shadow(shard, [positions[i] for i in take], audit)
            out = self.predictor.predict_encoded(self._encoded(rows.take(pa.array(take, pa.int64()))),
                                                 keys=[ids[i] for i in take], shadow=shadow)
            pieces.append(_Piece(take, out, audited, time.perf_counter() - t, before=False))
            exact[take] = [self.predictor.exact and p.exit_layer == L for p in out.predictions]
            pending = []
        calibration = int(exact.sum()) - sum(int(exact[p.rows].sum()) for p in pieces)
        for piece in pieces:
            for i, p in zip(piece.rows, piece.out.predictions):
                values[i] = (ids[i], p.label, p.label_id, p.score, p.exit_layer, p.truncated, p.error, p.logits)
        stats = self._part_stats(shard, positions, values, exact, pieces, calibration, L)
        table, removed = self._table(rows, positions, values)
        stats["filtered_out"] = removed
        stats["before_decision"] = sum(len(p.rows) for p in pieces if p.before)
        write_part(table, self.output_url, shard, int(min(positions)), stats)
        for piece in pieces:
            if self.client is not None and len(piece.out.feedback) and not piece.before:
                self.client.report(piece.out.feedback, output_rows=len(piece.rows))
        return self._summary(shard, "bulk", values, pieces, stats, removed)

    def _table(self, rows: pa.Table, positions: list[int], values: list[tuple]) -> tuple[pa.Table, int]:
        """The part: one row per input row (ANSWER_COLUMNS, passthrough columns, every label's score when
        `output.probabilities`), less the rows `output.filter` removes (then each row keeps its position in
        the shard, `row`); and how many it removed."""
        from pipeline.offline.output import keep_mask, label_score_columns

        cols = list(zip(*values))
        table = {
            "id": list(cols[0]),
            "label": list(cols[1]),
            "label_id": pa.array(cols[2], pa.int64()),
            "score": pa.array(cols[3], pa.float32()),
            "exit_layer": pa.array(cols[4], pa.int16()),
            "truncated": list(cols[5]),
            "error": pa.array(cols[6], pa.string()),
        }
        for c in self.passthrough:
            table[c] = rows.column(c)
        if self.output.get("probabilities"):
            table.update(label_score_columns(self.predictor.head, cols[7]))
        out = pa.table(table)
        spec = self.output.get("filter")
        if not spec:
            return out, 0
        keep = keep_mask(spec, cols[1], cols[3], cols[6], self.predictor.head.kind == "multi_label")
        out = out.append_column("row", pa.array(positions, pa.int64())).filter(pa.array(keep))
        return out, int((~keep).sum())

    def _summary(self, shard: int, kind: str, values: list[tuple], pieces: list["_Piece"], stats: dict | None,
                 removed: int = 0) -> dict:
        """The row this item adds to the job's summary (the same keys for every kind of item)."""
        L = self.predictor.model.num_layers
        after = [p for p in pieces if not p.before and kind == "bulk"]  # the rows at the decided thresholds

        def layers(ps):
            return np.sum([p.out.stats["layer_rows"] for p in ps], axis=0).astype(int).tolist() if ps else [0] * L

        return {
            "kind": kind,
            "shard": shard,
            "rows": len(values),
            "errors": sum(v[6] is not None for v in values),
            "errors_by_kind": json.dumps(Counter(error_kind(v[6]) for v in values if v[6] is not None)),
            "truncated": sum(bool(v[5]) for v in values),
            "exits": np.bincount([v[4] for v in values], minlength=L + 1).tolist(),
            "layer_rows": layers(pieces),
            "layer_rows_after_decision": layers(after),
            "bulk_answer_layers": int(sum(x.exit_layer for p in after for x in p.out.predictions)),
            "shadow_rows": sum(len(p.out.feedback) for p in after),
            "shadow_agree": sum(p.out.shadow_agreement()[0] for p in after),
            "exact_before_decision": sum(len(p.rows) for p in pieces if p.before),
            "seconds_before_decision": sum(p.seconds for p in pieces if p.before),
            "filtered_out": removed,
            "policy_version": int(self.predictor.policy.version),
            "seconds": sum(p.seconds for p in pieces),
            "finished_at": time.time(),  # wall clock: where the job's time went
            "reference_seconds": sum(p.out.stats.get("reference_seconds", 0.0) for p in pieces),
            "token_budget": self.predictor.budget.value,
            "worker": self.worker,
            "compression": self.predictor.compression,
            "precision": f"{str(self.predictor.dtype).removeprefix('torch.')} ({self.predictor.dtype_reason})",
            "part_stats": None if stats is None else json.dumps(stats),
        }

    def _part_stats(self, shard: int, positions: list[int], values: list[tuple], exact: np.ndarray,
                    pieces: list["_Piece"], calibration: int, L: int) -> dict:
        """The part's counts for the certificate (pipeline.offline.certificate.COUNTS): `exact` rows were
        answered by the float original; the audit measures the others against it."""
        answered = np.array([v[6] is None for v in values])
        early = answered & ~exact
        ramp = early & np.array([v[4] < L for v in values])
        stats = {"shard": shard, "first_row": int(min(positions)), "rows": len(values),
                 "answered": int(answered.sum()), "calibration": int(calibration), "early": int(early.sum()),
                 "exact": int((answered & exact).sum()),
                 "ramp": int(ramp.sum()), "audit": 0, "audit_disagree": 0, "audit_early": 0,
                 "audit_early_disagree": 0, "audit_ramp": 0, "audit_ramp_disagree": 0,
                 # which rows the float original did not answer: what --repair and a top-up re-run
                 "early_positions": [positions[i] for i in np.flatnonzero(early)]}
        for piece in pieces:
            if piece.audited is None:
                continue
            fb = piece.out.feedback
            for k, i in enumerate(piece.out.feedback_rows.tolist()):
                if not piece.audited[i]:
                    continue
                p = piece.out.predictions[i]
                wrong = int(p.label_id != int(fb.labels[k]))
                stats["audit"] += 1
                stats["audit_disagree"] += wrong
                if early[piece.rows[i]]:
                    stats["audit_early"] += 1
                    stats["audit_early_disagree"] += wrong
                if ramp[piece.rows[i]]:
                    stats["audit_ramp"] += 1
                    stats["audit_ramp_disagree"] += wrong
        return stats


@dataclass
class _Piece:
    """Rows of a shard run in one call: `rows` (indices into the shard's rows), the Predictor's output, the audit
    among them (None: no audit), the seconds it took, and whether it ran before the calibration decision."""

    rows: list[int]
    out: object
    audited: np.ndarray | None
    seconds: float
    before: bool
