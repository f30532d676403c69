"""The two stages that run on the cluster: tokenize (stateless tasks) and infer (actor pool).

tokenize_shards: shard descriptors -> rows with ids, token ids, per-row errors (Ray tasks, CPU).
EarlyExitWorker: tokenized rows -> predictions written as the shard's part file; returns a
one-row summary per shard (rows, exits per layer, shadow agreement, thresholds version, worker).
"""
from __future__ import annotations

import functools
import logging
import os
import posixpath
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.offline.shards import Shard, read_shard
from pipeline.offline.sink import write_part

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _encoder(model: str, max_length: int | None):
    from pipeline.engine.encoder import TextEncoder

    return TextEncoder.from_artifact(model, max_length)


def tokenize_shards(batch: pa.Table, model: str, text_column: str, id_column: str | None,
                    passthrough: list[str], max_length: int | None) -> pa.Table:
    """One output table for the shard(s) in `batch`. Bad rows keep their place with an error."""
    out = []
    for d in batch.to_pylist():
        shard = Shard(d["shard"], d["path"], d["start"], d["stop"])
        table = read_shard(shard)
        missing = [c for c in [text_column, id_column, *passthrough] if c and c not in table.column_names]
        if missing:
            raise ValueError(f"{shard.path} has no column {missing[0]!r} (columns: {table.column_names})")
        texts = table.column(text_column).to_pylist()
        if id_column:
            ids = [None if v is None else str(v) for v in table.column(id_column).to_pylist()]
        else:  # stable ids: file name and row number, the same on every run
            base = posixpath.basename(shard.path)
            ids = [f"{base}:{shard.start + i}" for i in range(len(texts))]
        enc = _encoder(model, max_length).encode(texts)
        cols = {
            "id": pa.array(ids, pa.string()),
            "input_ids": pa.array(enc.input_ids, pa.list_(pa.int32())),
            "truncated": pa.array(enc.truncated),
            "error": pa.array(enc.errors, pa.string()),
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
                 controller: dict | None = None):
        from pipeline.config import EngineConfig
        from pipeline.engine.predictor import Predictor

        logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load on CPU
        self.predictor = Predictor(model, EngineConfig(**engine))
        log.info("worker warmed up in %.1f s", self.predictor.warm_up())  # a compiled model compiles now
        self.output_url = output_url
        self.passthrough = passthrough
        import ray

        # node id, not host name: several nodes can share one host (ray.cluster_utils.Cluster)
        self.worker = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
        self.client = None
        if controller:
            from pipeline.control.controller import ControllerClient
            from pipeline.control.shared import initial_state

            initial = initial_state(self.predictor.manifest, list(self.predictor.policy.thresholds))
            self.client = ControllerClient(controller["name"], controller["namespace"], initial_state=initial,
                                           refresh_every=controller["refresh_every_batches"])

    def _maybe_update_policy(self) -> None:
        from pipeline.engine.policy import ExitPolicy

        if self.client is None:
            return
        self.client.maybe_refresh()
        if self.client.version > self.predictor.policy.version:
            self.predictor.set_policy(ExitPolicy(self.client.thresholds, self.client.active, self.client.version))

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.engine.encoder import Encoded

        summaries = []
        for shard in sorted(set(batch.column("shard").to_pylist())):
            rows = batch.filter(pc.equal(batch.column("shard"), shard))
            self._maybe_update_policy()
            t = time.perf_counter()
            enc = Encoded(
                [list(x) for x in rows.column("input_ids").to_numpy(zero_copy_only=False)],
                rows.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
                rows.column("error").to_pylist(),
            )
            ids = rows.column("id").to_pylist()
            out = self.predictor.predict_encoded(enc, keys=ids)
            seconds = time.perf_counter() - t
            preds = out.predictions
            table = {
                "id": ids,
                "label": [p.label for p in preds],
                "label_id": pa.array([p.label_id for p in preds], pa.int32()),
                "score": pa.array([p.score for p in preds], pa.float32()),
                "exit_layer": pa.array([p.exit_layer for p in preds], pa.int16()),
                "truncated": [p.truncated for p in preds],
                "error": pa.array([p.error for p in preds], pa.string()),
            }
            for c in self.passthrough:
                table[c] = rows.column(c)
            first_row = int(pc.min(rows.column("row")).as_py())
            write_part(pa.table(table), self.output_url, int(shard), first_row)

            fb = out.feedback
            shadow_agree, _ = out.shadow_agreement()
            if self.client is not None and len(fb):
                self.client.report(fb)
            L = self.predictor.model.num_layers
            summaries.append({
                "shard": int(shard),
                "rows": len(preds),
                "errors": sum(p.error is not None for p in preds),
                "truncated": sum(p.truncated for p in preds),
                "exits": np.bincount([p.exit_layer for p in preds], minlength=L + 1).tolist(),
                "shadow_rows": len(fb),
                "shadow_agree": shadow_agree,
                "policy_version": int(self.predictor.policy.version),
                "seconds": seconds,
                "token_budget": out.stats["token_budget"],
                "worker": self.worker,
                "compression": self.predictor.compression,
            })
        return pa.Table.from_pylist(summaries)
