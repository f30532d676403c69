"""The two stages that run on the cluster: tokenize (stateless tasks) and infer (actor pool).

tokenize_shards: shard descriptors -> rows with ids, token ids, per-row errors (Ray tasks, CPU).
EarlyExitWorker: tokenized rows -> predictions written as the shard's part file; returns a
one-row summary per shard (rows, exits per layer, shadow agreement, thresholds version, worker).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections import Counter

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
    """One output table for the shard(s) in `batch`. Bad rows keep their place with an error (a line that could
    not be read as a row, else the text's)."""
    out = []
    for d in batch.to_pylist():
        shard = Shard(d["shard"], d["path"], d["start"], d["stop"])
        table = read_shard(shard, text_column)
        require_columns(table, [text_column, id_column, *passthrough], shard.path,
                        "every input file must have the job's input columns")
        texts = table.column(text_column).to_pylist()
        ids = row_ids(table, shard, id_column)
        enc = _encoder(model, max_length).encode(texts)
        cols = {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(enc.input_ids, pa.list_(pa.int32())),
            "truncated": pa.array(enc.truncated),
            "error": pa.array([r or e for r, e in zip(row_errors(table), enc.errors)], pa.string()),
            "shard": pa.array([shard.shard] * len(texts), pa.int64()),
            "row": pa.array(range(len(texts)), pa.int64()),
        }
        for c in passthrough:
            cols[c] = table.column(c)
        out.append(pa.table(cols))
    return pa.concat_tables(out)


class EarlyExitWorker:
    """Hosts one early-exit model; classifies whole shards and writes their parts."""

    def __init__(self, model: str, engine: dict, output_url: str, passthrough: list[str],
                 controller: dict | None = None, certify: dict | None = None):
        from pipeline.config import EngineConfig
        from pipeline.engine.predictor import Predictor

        logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load on CPU
        self.predictor = Predictor(model, EngineConfig(**engine))
        log.info("worker warmed up in %.1f s", self.predictor.warm_up())  # a compiled model compiles now
        self.output_url = output_url
        self.passthrough = passthrough
        # Certified jobs: the calibration rows' answers (shard -> position -> output values), the audit's
        # sampling rate and seed. None: the engine's shadow_fraction alone feeds the controller.
        self.certify = certify
        import ray

        # node id, not host name: several nodes can share one host (ray.cluster_utils.Cluster)
        self.worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
        self.client = None
        if controller:
            from pipeline.control.client import ControllerClient

            self.client = ControllerClient.for_policy(controller, self.predictor.policy)

    def _shadow(self, shard: int, positions: list[int]) -> tuple[np.ndarray | None, np.ndarray | None]:
        """([n] rows to run to the end, [n] the audit among them): the audit is a fixed-rate sample for the
        certificate, the rest the extra rows the controller asks for while its evidence is thin.
        (None, None): the engine's shadow_fraction, no audit."""
        from pipeline.engine.predictor import key_uniforms

        if self.certify is None:
            return None, None
        keys = [f"{shard}:{r}" for r in positions]
        seed, audit = self.certify["seed"], self.certify["audit_fraction"]
        extra = max(0.0, (self.client.feedback_fraction if self.client else 0.0) - audit)
        audited = key_uniforms(keys, f"audit{seed}") < audit
        return audited | (key_uniforms(keys, f"steer{seed}") < extra), audited

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.engine.encoder import Encoded

        L = self.predictor.model.num_layers
        summaries = []
        for shard in sorted(set(batch.column("shard").to_pylist())):
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            if self.client is not None:
                self.client.refresh_policy(self.predictor)
            t = time.perf_counter()
            positions = rows.column("row").to_pylist()
            attempts.mark(self.output_url, int(shard), int(min(positions)))
            known = (self.certify or {}).get("calibrated", {}).get(int(shard), {})
            todo = [i for i, r in enumerate(positions) if r not in known]  # calibration rows are answered
            sub = rows.take(pa.array(todo, pa.int64())) if len(todo) < len(positions) else rows
            enc = Encoded(
                [list(x) for x in sub.column("input_ids").to_numpy(zero_copy_only=False)],
                sub.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
                sub.column("error").to_pylist(),
            )
            ids = rows.column("id").to_pylist()
            shadow, audited = self._shadow(int(shard), [positions[i] for i in todo])
            out = self.predictor.predict_encoded(enc, keys=[ids[i] for i in todo], shadow=shadow)
            seconds = time.perf_counter() - t
            values = [known[r] if r in known else None for r in positions]  # ANSWER_COLUMNS order
            for i, p in zip(todo, out.predictions):
                values[i] = (ids[i], p.label, p.label_id, p.score, p.exit_layer, p.truncated, p.error)
            cols = list(zip(*values))
            table = {
                "id": list(cols[0]),
                "label": list(cols[1]),
                "label_id": pa.array(cols[2], pa.int32()),
                "score": pa.array(cols[3], pa.float32()),
                "exit_layer": pa.array(cols[4], pa.int16()),
                "truncated": list(cols[5]),
                "error": pa.array(cols[6], pa.string()),
            }
            for c in self.passthrough:
                table[c] = rows.column(c)
            first_row = int(min(positions))
            stats = self._part_stats(int(shard), first_row, values, out, audited, len(positions) - len(todo), L)
            write_part(pa.table(table), self.output_url, int(shard), first_row, stats if self.certify else None)

            fb = out.feedback
            shadow_agree, _ = out.shadow_agreement()
            if self.client is not None and len(fb):
                self.client.report(fb, output_rows=len(todo))
            exits = [v[4] for v in values]
            summaries.append({
                "shard": int(shard),
                "rows": len(values),
                "errors": sum(v[6] is not None for v in values),
                "errors_by_kind": json.dumps(Counter(error_kind(v[6]) for v in values if v[6] is not None)),
                "truncated": sum(bool(v[5]) for v in values),
                "exits": np.bincount(exits, minlength=L + 1).tolist(),
                "layer_rows": out.stats["layer_rows"],
                "bulk_answer_layers": int(sum(p.exit_layer for p in out.predictions)),
                "shadow_rows": len(fb),
                "shadow_agree": shadow_agree,
                "policy_version": int(self.predictor.policy.version),
                "seconds": seconds,
                "token_budget": out.stats["token_budget"],
                "worker": self.worker,
                "compression": self.predictor.compression,
                "part_stats": json.dumps(stats),
            })
        return pa.Table.from_pylist(summaries)

    def _part_stats(self, shard: int, first_row: int, values: list[tuple], out, audited: np.ndarray | None,
                    calibration: int, L: int) -> dict:
        """The part's counts for the certificate (pipeline.offline.certificate.COUNTS)."""
        answered = [v for v in values if v[6] is None]
        early = sum(v[4] < L for v in answered)
        stats = {"shard": shard, "first_row": first_row, "rows": len(values), "answered": len(answered),
                 "calibration": int(calibration), "early": int(early), "exact": len(answered) - int(early),
                 "audit": 0, "audit_disagree": 0, "audit_early": 0, "audit_early_disagree": 0}
        if audited is None or not len(out.feedback):
            return stats
        for k, i in enumerate(out.feedback_rows.tolist()):
            if not audited[i]:
                continue
            p = out.predictions[i]
            wrong = int(p.label_id != int(out.feedback.final[k]))
            stats["audit"] += 1
            stats["audit_disagree"] += wrong
            if p.exit_layer < L:
                stats["audit_early"] += 1
                stats["audit_early_disagree"] += wrong
        return stats
