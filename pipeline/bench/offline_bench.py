"""Offline benchmark (`offramp bench offline`): the movie-review corpus repeated to >= 50k rows.

Side by side, one run, this machine:
 (a) Ray's documented batch inference: read_parquet -> map_batches(actor pool running the original
     transformers model at a fixed batch size) — the baseline;
 (b) offramp's job (`offramp run`) with the bootstrapped early-exit model and the YAML's levers;
 (c) ONNX Runtime int8 dynamic, length-sorted batches, one process — the strongest single-machine peer.
Agreement is with the original float model's predictions (from (a)); accuracy is against gold labels.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench import write_result


def make_corpus(path: Path, rows: int) -> Path:
    """The movie-review corpus repeated (shuffled per copy) to `rows` rows, with unique ids."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import load_dataset

    ds = load_dataset("movie-reviews")
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.permutation(len(ds)) for _ in range(-(-rows // len(ds)))])[:rows]
    pq.write_table(pa.table({
        "id": [f"r{i}" for i in range(rows)],
        "text": [ds.texts[i] for i in idx],
        "gold_label": [ds.label_names[ds.labels[i]] for i in idx],
    }), path, row_group_size=4096)
    return path


class _HFBaseline:
    """What Ray's batch-inference docs show: a transformers pipeline inside a map_batches actor."""

    def __init__(self, model_dir: str, batch_size: int):
        from transformers import pipeline

        self.pipe = pipeline("text-classification", model=model_dir, device=-1, local_files_only=True)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        out = self.pipe(list(batch["text"]), batch_size=self.batch_size, truncation=True)
        return {"id": batch["id"], "label": np.array([o["label"] for o in out])}


def run_baseline(corpus: str, model_dir: str, actors: int, num_cpus: float, batch_size: int) -> tuple[dict, float]:
    import ray
    from ray.data import ActorPoolStrategy

    t = time.perf_counter()
    # repartition: the new parquet reader makes one block, which would leave one actor doing everything
    ds = ray.data.read_parquet(corpus).repartition(actors * 8)
    ds = ds.map_batches(_HFBaseline, fn_constructor_kwargs={"model_dir": model_dir, "batch_size": batch_size},
                        batch_size=batch_size, compute=ActorPoolStrategy(size=actors), num_cpus=num_cpus)
    rows = ds.take_all()
    return {r["id"]: r["label"] for r in rows}, time.perf_counter() - t


def run_offline_bench(model: str, config: str = "configs/jobs/movie_reviews.yaml", rows: int = 50_000,
                      out_json: str = "bench_results/offline.json", skip_baseline: bool = False,
                      engine_overrides: dict | None = None, echo=print) -> dict:
    import pyarrow.parquet as pq
    import ray

    from pipeline.bench.onnx_peer import export_int8, run_onnx
    from pipeline.config import JobConfig
    from pipeline.model.artifact import load_tokenizer
    from pipeline.offline.job import run_job

    work = Path(tempfile.mkdtemp(prefix="offramp-bench-"))
    corpus = str(make_corpus(work / "corpus.parquet", rows))
    table = pq.read_table(corpus)
    ids, texts, gold = (table.column(c).to_pylist() for c in ("id", "text", "gold_label"))
    cfg = JobConfig.from_yaml(config, model=model)
    engine = cfg.engine.model_copy(update=engine_overrides or {})
    cfg = cfg.model_copy(update={
        "engine": engine,
        "input": cfg.input.model_copy(update={"url": corpus, "id_column": "id", "passthrough": []}),
        "output": cfg.output.model_copy(update={"url": str(work / "out")}),
        "controller": cfg.controller.model_copy(update={"checkpoint_url": None, "name": f"bench-{os.getpid()}"}),
    })
    a = cfg.actors
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    results: list[dict] = []
    try:
        model_dir = f"{model}/model"
        ref_by_id = None
        if not skip_baseline:
            # 0.5 CPU per actor: read/repartition tasks need a whole CPU, or the baseline hangs on 2 cores
            ref_by_id, secs = run_baseline(corpus, model_dir, a.max_actors, min(a.num_cpus, 0.5), 64)
            results.append({"method": f"(a) Ray Data docs: map_batches, {a.max_actors} actors, transformers, batch 64",
                            "seconds": secs, "labels": [ref_by_id[i] for i in ids]})
        summary = run_job(cfg, echo=lambda m: None)
        out = pq.read_table(str(work / "out"), columns=["id", "label"]).to_pydict()
        by_id = dict(zip(out["id"], out["label"]))
        ran = sorted(set(summary["compression_per_worker"].values()))
        short = ", ".join("uncompressed" if c == "none" else c.split(":")[0] for c in ran)  # why: in the JSON
        results.append({"method": f"(b) offramp job ({engine.dtype}, {engine.mode} mode, {short})",
                        "compression": ran,
                        "seconds": summary["seconds"], "labels": [by_id[i] for i in ids],
                        "mean_exit_layer": summary["mean_exit_layer"], "versions": summary["threshold_versions_seen"]})
    finally:
        ray.shutdown()
    tok = load_tokenizer(model_dir)
    onnx = export_int8(model_dir, str(Path("artifacts") / "onnx" / Path(model).name))
    names = [str(n) for n in json.loads(Path(model_dir, "config.json").read_text())["id2label"].values()]
    preds, secs = run_onnx(onnx, tok, texts, threads=os.cpu_count() or 2)
    results.append({"method": "(c) ONNX Runtime int8 dynamic, sorted batches of 64, 1 process",
                    "seconds": secs, "labels": [names[p] for p in preds]})

    ref = results[0]["labels"] if ref_by_id is not None else None
    base_rps = len(ids) / results[0]["seconds"] if ref_by_id is not None else None
    table_rows = []
    for r in results:
        rps = len(ids) / r["seconds"]
        table_rows.append({
            "method": r["method"], "rows": len(ids), "seconds": round(r["seconds"], 2), "rows_per_s": round(rps, 1),
            "vs_a": round(rps / base_rps, 2) if base_rps else None,
            "agreement_with_original": round(float(np.mean([x == y for x, y in zip(r["labels"], ref)])), 4) if ref else None,
            "gold_accuracy": round(float(np.mean([x == y for x, y in zip(r["labels"], gold)])), 4),
            **({"mean_exit_layer": r["mean_exit_layer"], "threshold_versions": r["versions"],
                "compression": r["compression"]} if "versions" in r else {}),
        })
    head = f"{'method':<72} {'rows/s':>8} {'x (a)':>6} {'agree':>7} {'acc':>7}"
    echo(head)
    echo("-" * len(head))
    for r in table_rows:
        f = lambda v, fmt: fmt % v if v is not None else "-"  # noqa: E731
        echo(f"{r['method']:<72} {r['rows_per_s']:>8.1f} {f(r['vs_a'], '%5.2fx'):>6} "
             f"{f(r['agreement_with_original'], '%7.4f'):>7} {r['gold_accuracy']:>7.4f}")
    result = {"rows": len(ids), "cpus": os.cpu_count(), "config": config, "engine": engine.model_dump(),
              "results": table_rows}
    write_result(result, out_json, echo)
    return result
