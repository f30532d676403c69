"""Pruning benchmark: an artifact and its pruned versions side by side, measured in the same process on the same rows.

For each artifact (the unpruned source first: the baseline) and each dtype:
- plain: its classifier through transformers, input order, batches of 64 (full depth: how most users run it);
- full depth: offramp with every ramp closed (length-sorted token budgets, no exits);
- exits: offramp at the artifact's tuned thresholds.
Passes are interleaved (one pass of every artifact and mode per round, `reps` rounds, the best kept): a shared
machine's slow spells then hit every row of the table alike. Speed is `x unpruned`, the same mode and dtype of the
source. Agreement is with the float32 original's plain predictions; accuracy against gold labels.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import machine, write_result
from pipeline.config import EngineConfig


def _plain_runner(ee_dir: str, dtype: torch.dtype, batch_size: int):
    from pipeline.model.artifact import load_classifier, load_tokenizer

    model = load_classifier(f"{ee_dir}/model").to(dtype=dtype)
    tok = load_tokenizer(f"{ee_dir}/model")

    @torch.inference_mode()
    def run(texts: list[str]):
        out = np.empty(len(texts), np.int64)
        for s in range(0, len(texts), batch_size):
            enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt")
            out[s:s + batch_size] = model(**enc).logits.argmax(-1).numpy()
        return out, None

    return run


def _offramp_runner(ee_dir: str, dtype: str, closed: bool):
    from pipeline.engine.predictor import Predictor
    from pipeline.model.artifact import read_manifest

    R = len(read_manifest(ee_dir).ramps)
    p = Predictor(ee_dir, EngineConfig(dtype=dtype, thresholds=[1.0] * R if closed else None))

    def run(texts: list[str]):
        out = p.predict(texts)
        return (np.array([x.label_id for x in out.predictions]), np.array([x.exit_layer for x in out.predictions]))

    return run


def _describe(ee_dir: str) -> dict:
    from pipeline.model.artifact import read_manifest

    m = read_manifest(ee_dir)
    pr = m.pruning or {}
    check = pr.get("check") or {}
    return {"ffn": pr.get("ffn", 0.0), "heads": pr.get("heads", 0.0), "params": pr.get("params_after"),
            "widths": pr.get("widths_after"), "check_agreement": check.get("agreement"),
            "check_rows": check.get("rows"), "recover_steps": (pr.get("recovery") or {}).get("steps")}


def run_pruning_bench(source: str, pruned: list[str], dataset: str = "movie-reviews", split: str = "test",
                      limit: int | None = None, dtypes: tuple[str, ...] = ("float32",), modes=("plain", "full", "exits"),
                      reps: int = 3, batch_size: int = 64, out_json: str | None = None, echo=print) -> dict:
    from pipeline.data.datasets import BUILTIN, load_dataset
    from pipeline.model.artifact import original_of

    for p in pruned:
        if Path(original_of(p)).resolve() != Path(source).resolve():
            raise ValueError(f"{p} was not pruned from {source} (its original is {original_of(p)})")
    ds = load_dataset(dataset)
    ds = ds.split(split) if dataset in BUILTIN else ds
    ds = ds.sample(limit)
    texts, gold = ds.texts, ds.labels
    artifacts = [source, *pruned]
    ref, _ = _plain_runner(source, torch.float32, batch_size)(texts)  # the float original's answers

    rows: list[dict] = []
    for dtype in dtypes:
        runners = {}
        for a in artifacts:
            for mode in modes:
                if mode == "plain":
                    runners[(a, mode)] = _plain_runner(a, getattr(torch, dtype), batch_size)
                else:
                    runners[(a, mode)] = _offramp_runner(a, dtype, closed=mode == "full")
                runners[(a, mode)](texts[:batch_size])  # warm-up: allocator, kernels
        best = {k: float("inf") for k in runners}
        answers = {}
        for r in range(reps):
            for k, run in runners.items():
                t = time.perf_counter()
                answers[k] = run(texts)
                best[k] = min(best[k], time.perf_counter() - t)
            echo(f"bench pruning {dtype}: round {r + 1}/{reps} done")
        for a in artifacts:
            info = _describe(a) if a != source else {"ffn": 0.0, "heads": 0.0}
            for mode in modes:
                labels, layers = answers[(a, mode)]
                rps = len(texts) / best[(a, mode)]
                base = len(texts) / best[(source, mode)]
                rows.append({
                    "artifact": a, "dtype": dtype, "mode": mode, **info,
                    "rows_per_s": rps, "vs_unpruned": rps / base,
                    "agreement": float((labels == ref).mean()),
                    "accuracy": float((labels == gold).mean()) if gold is not None else None,
                    "mean_exit_layer": float(np.mean(layers)) if layers is not None else None,
                })
        del runners
    result = {"machine": machine(), "source": source, "pruned": pruned, "dataset": ds.name, "rows": len(texts),
              "reps": reps, "torch_threads": torch.get_num_threads(), "rows_table": rows}
    echo(format_table(rows))
    write_result(result, out_json, echo)
    return result


MODE_NAMES = {"plain": "plain transformers", "full": "offramp full depth", "exits": "offramp tuned exits"}


def format_table(rows: list[dict]) -> str:
    head = (f"{'artifact':<36} {'ffn':>4} {'heads':>5} {'dtype':<8} {'mode':<20} {'rows/s':>7} {'x unpr.':>7} "
            f"{'agree':>7} {'acc':>6} {'exit L':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        f = lambda v, fmt: (fmt % v) if v is not None else "-"  # noqa: E731
        lines.append(f"{r['artifact'][-36:]:<36} {r['ffn']:>4.0%} {r['heads']:>5.0%} {r['dtype']:<8} "
                     f"{MODE_NAMES[r['mode']]:<20} {r['rows_per_s']:>7.1f} {r['vs_unpruned']:>6.2f}x "
                     f"{r['agreement']:>7.4f} {f(r['accuracy'], '%6.4f'):>6} {f(r['mean_exit_layer'], '%6.2f'):>6}")
    return "\n".join(lines)

