"""The throughput-agreement frontier (`offramp bench frontier`): every way a user could classify a corpus, one
run, one corpus, one machine.

Peers (what a user writes in an afternoon), each in one warmed process unless said otherwise:
 - Ray Data's documented batch inference (map_batches, a transformers pipeline in an actor pool, batch 64);
 - torch float32 and bfloat16, length-sorted batches of 64;
 - ONNX Runtime float32, and int8 dynamic quantization per-tensor and per-channel, length-sorted batches of 64.
offramp: the certified job (`offramp run`, a local Ray, every row written to parquet) at several promises, on the
float artifact (the engine's own precision choice) and on each other artifact given (e.g. int8). A job's time is
its whole run, Ray's start included. Beside each job, the Predictor alone (one process, no Ray, no certificate)
at the job's own thresholds and precision: the job / engine ratio says what the job's machinery costs.

Agreement of every point is with the float original on every row: torch float32's answers are that reference.
Prints the table, writes JSON (`points`: system, config, rows_per_s, agreement, agreement_rows, promise) and a PNG
of rows/s against agreement.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench import machine, timed_job, write_result
from pipeline.offline.certificate import OWN_HEAD

PROMISES = (0.995, 0.99, 0.98, 0.965)


def _sorted_torch(model_dir: str, texts: list[str], dtype, threads: int) -> tuple[np.ndarray, float]:
    """A transformers classifier at `dtype`, length-sorted batches of 64: answers in input order, seconds
    (tokenization included, after an untimed warm-up batch)."""
    import torch

    from pipeline.data.batching import padded_batches
    from pipeline.model.artifact import load_classifier, load_tokenizer

    torch.set_num_threads(threads)
    model = load_classifier(model_dir).to(dtype=dtype)
    tok = load_tokenizer(model_dir)
    pad = tok.pad_token_id or 0

    @torch.inference_mode()
    def run(batch: list[str]) -> np.ndarray:
        out = np.empty(len(batch), np.int64)
        rows = tok(batch, truncation=True, max_length=512)["input_ids"]
        for idx, ids, mask in padded_batches(rows, pad, 64):
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            out[idx] = logits.float().argmax(-1).numpy()
        return out

    run(texts[:64])
    t = time.perf_counter()
    preds = run(texts)
    return preds, time.perf_counter() - t


def _predictor_alone(model: str, texts: list[str], engine: dict, threads: int,
                     original: bool = False) -> tuple[np.ndarray, float]:
    """offramp's engine in one process at the given engine settings (thresholds, dtype): answers, seconds.
    `original`: the float original answers, as in a job whose calibration chose it (not `model`'s compression)."""
    import torch

    from pipeline.config import EngineConfig
    from pipeline.engine.predictor import Predictor

    torch.set_num_threads(threads)
    p = Predictor(model, EngineConfig(**engine), reference=original)
    if original:
        p.use_original()
    p.warm_up()
    p.predict(texts[:256])
    t = time.perf_counter()
    out = p.predict(texts)
    return np.array([x.label_id for x in out.predictions]), time.perf_counter() - t


def _job(model: str, corpus: str, config: str, work: Path, promise: float, tag: str) -> tuple[dict, float, dict]:
    """The certified job at `promise`: (summary, seconds of the whole run, id -> label_id)."""
    import pyarrow.parquet as pq

    from pipeline.config import JobConfig

    out = work / f"job-{tag}"
    summary, seconds = timed_job(JobConfig.from_yaml(config, model=model), out, f"frontier-{tag}",
                                 input={"url": corpus, "id_column": "id", "passthrough": []},
                                 certify={"constraint": round(1 - promise, 6), "on_uncertified": "warn"})
    table = pq.read_table(str(out), columns=["id", "label_id"]).to_pydict()
    return summary, seconds, dict(zip(table["id"], table["label_id"]))


def run_frontier_bench(model: str, others: list[str], config: str = "configs/jobs/movie_reviews.yaml",
                       rows: int = 50_000, promises: tuple[float, ...] = PROMISES, skip_ray_docs: bool = False,
                       out_json: str = "bench_results/frontier.json", plot: str | None = "bench_results/frontier.png",
                       echo=print) -> dict:
    import pyarrow.parquet as pq
    import torch

    from pipeline.bench.offline_bench import make_corpus, run_baseline
    from pipeline.bench.onnx_peer import export, run_onnx
    from pipeline.model.artifact import load_tokenizer

    threads = os.cpu_count() or 2
    work = Path(tempfile.mkdtemp(prefix="offramp-frontier-"))
    corpus = str(make_corpus(work / "corpus.parquet", rows))
    table = pq.read_table(corpus)
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    model_dir = f"{model}/model"
    points: list[dict] = []

    echo(f"frontier: {rows} rows (the movie-review corpus repeated), {machine()}")
    reference, secs = _sorted_torch(model_dir, texts, torch.float32, threads)

    def add(system: str, config_: str, seconds: float, answers, promise=None, label: str = "", **extra):
        answers = np.asarray(answers)
        point = {"system": system, "config": config_, "label": label or config_.split(",")[0],
                 "rows_per_s": round(len(texts) / seconds, 1),
                 "agreement": round(float((answers == reference).mean()), 5), "agreement_rows": len(texts),
                 "promise": promise, **extra}
        points.append(point)
        echo(f"  {system:<8} {config_:<62} {point['rows_per_s']:>8.1f} rows/s  agreement {point['agreement']:.4%}")

    add("torch", "float32, sorted batches of 64 (the reference)", secs, reference)
    preds, secs = _sorted_torch(model_dir, texts, torch.bfloat16, threads)
    add("torch", "bfloat16, sorted batches of 64", secs, preds)
    tok = load_tokenizer(model_dir)
    for kind in ("fp32", "int8-per-tensor", "int8-per-channel"):
        path = export(model_dir, str(Path("artifacts") / "onnx" / Path(model).name), kind)
        preds, secs = run_onnx(path, tok, texts, threads=threads)
        add("onnxrt", f"{kind}, sorted batches of 64", secs, preds)
    if not skip_ray_docs:
        import ray

        label_ids = {n: i for i, n in enumerate(tok_labels(model_dir))}
        ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
        try:
            by_id, secs = run_baseline(corpus, model_dir, 2, 0.5, 64)
        finally:
            ray.shutdown()
        add("ray-data", "docs way: map_batches, 2 actors, transformers pipeline, batch 64", secs,
            [label_ids[by_id[i]] for i in ids])

    for artifact in [model, *others]:
        for promise in promises:
            tag = f"{Path(artifact).name}-{promise}"
            summary, secs, by_id = _job(artifact, corpus, config, work, promise, tag)
            cert = summary.get("certificate") or {}
            cal = cert.get("calibration_report") or {}
            engine = {"thresholds": summary["controller"]["thresholds"] if summary.get("controller") else
                      cal.get("thresholds"), "dtype": _dtype_of(summary)}
            answered_by = cert.get("answer_with", "model")
            alone, alone_s = _predictor_alone(artifact, texts, {**engine, "mode": "exit", "shadow_fraction": 0.0},
                                              threads, original=answered_by == "original")
            add("offramp", f"certified job, promise {promise:.1%}, {Path(artifact).name} ({engine['dtype']}, "
                           f"answered by the {'float original' if answered_by == 'original' else 'artifact'}"
                           f"{', audited against its own head' if cert.get('audit_against') == OWN_HEAD else ''})",
                secs, [by_id[i] for i in ids], promise, label=f"{promise:.1%} {Path(artifact).name}",
                certified=cert.get("certified"), claimed_interval=cert.get("interval"),
                mean_exit_layer=summary.get("mean_exit_layer"), pipeline_seconds=summary.get("seconds"),
                engine_rows_per_s=round(len(texts) / alone_s, 1),
                job_vs_engine=round(alone_s / secs, 3), engine_agreement=round(float((alone == reference).mean()), 5),
                cost=cert.get("cost"), timeline=summary.get("timeline"))
    result = {"machine": machine(), "rows": rows, "threads": threads, "config": config, "models": [model, *others],
              "points": points}
    echo(format_table(points))
    write_result(result, out_json, echo)
    if plot:
        draw(points, plot, f"{rows} rows, {machine()}")
        echo(f"wrote {plot}")
    return result


def tok_labels(model_dir: str) -> list[str]:
    import json

    cfg = json.loads(Path(model_dir, "config.json").read_text())
    return [str(cfg["id2label"][str(i)]) for i in range(len(cfg["id2label"]))]


def _dtype_of(summary: dict) -> str:
    """The dtype the job's actors ended on (its summary's precision_per_worker, e.g. 'bfloat16 (why)')."""
    precisions = list((summary.get("precision_per_worker") or {}).values())
    return precisions[-1].split(" ")[0] if precisions else "float32"


def format_table(points: list[dict]) -> str:
    head = "| system | config | rows/s | agreement with the float original | promise | job / engine |"
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: -p["agreement"]):
        ratio = ("-" if p.get("job_vs_engine") is None
                 else f"{p['job_vs_engine']:.2f} ({p['engine_rows_per_s']:.0f} rows/s)")
        promise = ("-" if p["promise"] is None
                   else f"{p['promise']:.1%}" + ("" if p.get("certified") else " (NOT certified)"))
        lines.append(f"| {p['system']} | {p['config']} | {p['rows_per_s']:.1f} | {p['agreement']:.2%} | {promise} | "
                     f"{ratio} |")
    return "\n".join(lines)


def draw(points: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for system, marker in (("offramp", "o"), ("torch", "s"), ("onnxrt", "^"), ("ray-data", "x")):
        ps = [p for p in points if p["system"] == system]
        if ps:
            ax.scatter([100 * p["agreement"] for p in ps], [p["rows_per_s"] for p in ps], marker=marker, label=system)
            for p in ps:
                ax.annotate(p["label"][:28],
                            (100 * p["agreement"], p["rows_per_s"]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
    ax.set_xlabel("agreement with the float original (%, every row)")
    ax.set_ylabel("rows/s")
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
