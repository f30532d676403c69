"""`offramp quantize`: compress a classifier or an early-exit artifact, check it, record the check.

The output keeps the source's float safetensors weights (no pickle, no packed tensors) and records
the method and the check; loading re-applies the method (`load_artifact` for an artifact, skipping it
where its kernels are slow unless asked; `load_compressed_classifier` for a classifier directory with
`compression.json`).

The check runs the compressed model and its uncompressed source on the same held-out rows:
agreement of the final predictions (the budget applies to 1 - agreement), gold accuracy when labels
exist, logit SQNR, and for an artifact also the early-exit answers at the manifest's thresholds.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.compression.capability import cannot_run_here, slow_here
from pipeline.compression.registry import apply, make_config, to_record
from pipeline.data.batching import padded_batches
from pipeline.model.classify import classifier_logits

log = logging.getLogger(__name__)

COMPRESSION_JSON = "compression.json"


class BudgetExceeded(RuntimeError):
    """The compressed model lost more agreement than the budget allows (nothing was written)."""

    def __init__(self, record: dict):
        self.record = record
        c = record["check"]
        super().__init__(
            f"{record['method']} loses {c['agreement_loss']:.2%} agreement with the uncompressed model on "
            f"{c['rows']} rows of {c['data']}, over the budget of {c['budget']:.2%}; nothing was written. "
            "Raise --budget or pass --allow-loss to keep it anyway"
        )


def _previous_output(path: Path) -> bool:
    if (path / COMPRESSION_JSON).exists():
        return True
    try:
        return bool(json.loads((path / "manifest.json").read_text()).get("compression"))
    except (OSError, ValueError):
        return False


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def heldout_texts(data: str, limit: int | None = None, text_column: str = "text", label_column: str = "label"):
    """(name, texts, labels or None): a built-in dataset's test split, or every row of a file / URL."""
    from pipeline.data.datasets import BUILTIN, load_dataset
    from pipeline.data.texts import validate_text

    ds = load_dataset(data, text_column, label_column)
    ds = ds.split("test") if data in BUILTIN else ds
    keep = [i for i, t in enumerate(ds.texts) if validate_text(t) is None]
    ds = ds.take(keep).head(limit)
    if not len(ds):
        raise ValueError(f"check data {data!r} has no usable rows; give --data with a text column")
    return ds.name, ds.texts, ds.labels


def load_compressed_classifier(path: str, device: str = "cpu"):
    """An HF classifier with its directory's `compression.json` (if any) re-applied."""
    from pipeline.model.artifact import load_classifier

    model = load_classifier(path).to(device)
    rec = Path(path) / COMPRESSION_JSON
    if rec.exists():
        apply(model, json.loads(rec.read_text()))
    return model


# -- running both models the same way (length-sorted batches) --------------------------------------
@torch.inference_mode()
def run_early_exit(model, tokenizer, texts: list[str], thresholds, active, max_length: int = 128):
    """(final logits [N,C], exit-rule labels [N], exit layers [N]): release mode, so every row also runs to the end."""
    from pipeline.engine.executor import execute
    from pipeline.engine.policy import ExitPolicy

    device = next(model.parameters()).device
    policy = ExitPolicy(np.asarray(thresholds), np.asarray(active))
    final = torch.empty(len(texts), model.num_labels)
    label = torch.empty(len(texts), dtype=torch.long)
    layer = torch.empty(len(texts), dtype=torch.long)
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    for idx, ids, mask in padded_batches(rows, tokenizer.pad_token_id or 0, 64):
        idx, ids, mask = torch.from_numpy(idx), torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        final[idx] = model.full_forward(ids, mask).float().cpu()
        res = execute(model, ids, mask, policy, "release")
        label[idx], layer[idx] = res.label.cpu(), res.exit_layer.cpu()
    return final, label, layer


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (cf. torchao's tests); inf when identical."""
    noise = (ref.float() - x.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.float().norm() / noise))


def check(source_logits: torch.Tensor, logits: torch.Tensor, gold, data: str, budget: float) -> dict:
    src, pred = source_logits.argmax(-1).numpy(), logits.argmax(-1).numpy()
    agreement = float((src == pred).mean())
    out = {
        "data": data,
        "rows": int(len(pred)),
        "agreement": agreement,
        "agreement_loss": 1.0 - agreement,
        "budget": budget,
        "within_budget": 1.0 - agreement <= budget + 1e-12,
        "logit_sqnr_db": sqnr_db(source_logits, logits),
        "accuracy": float((pred == gold).mean()) if gold is not None else None,
        "source_accuracy": float((src == gold).mean()) if gold is not None else None,
    }
    if gold is not None:
        out["accuracy_drop"] = out["source_accuracy"] - out["accuracy"]
    return out


def quantize(model_dir: str, out: str, method: str, data: str = "movie-reviews", budget: float = 0.01,
             allow_loss: bool = False, limit: int | None = None, device: str = "cpu",
             options: dict | None = None, text_column: str = "text", label_column: str = "label",
             retune: bool = True, progress=None) -> dict:
    """Compress `model_dir` (artifact or classifier dir) with `method`, check it, write `out`.

    int8-dynamic without a `backend` option uses the registry's default (torchao) where it is fast and
    onednn on a CPU without AVX512-VNNI. Returns the record written: {"method", "config", "source",
    "check"[, "retune"]}. Raises BudgetExceeded (writing nothing) when the agreement loss is over `budget`
    and not `allow_loss`. For an artifact with `retune`, the exit thresholds are re-tuned for the
    compressed model (see `retune_thresholds`).
    """
    from pipeline.engine.loader import load_artifact
    from pipeline.model.artifact import (
        VALIDATION_FEEDBACK,
        load_classifier,
        load_tokenizer,
        read_manifest,
        write_manifest,
    )

    src_dir, out_dir = Path(model_dir), Path(out)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir!r} is not a directory; give a classifier or an artifact directory")
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"--out {out!r} is the source directory; write the compressed model somewhere else")
    if not 0 <= budget < 1:
        raise ValueError(f"budget={budget} must be in [0, 1), e.g. 0.01 for 1% agreement loss")
    if out_dir.exists() and any(out_dir.iterdir()) and not _previous_output(out_dir):
        raise ValueError(f"--out {out!r} exists and is not an earlier `offramp quantize` output; choose a new directory")
    options = dict(options or {})
    if (method == "int8-dynamic" and "backend" not in options and slow_here(method, device)
            and not cannot_run_here(to_record(method, make_config(method, backend="onednn")), device)):
        # The default backend (torchao) has no fast kernels on this CPU; oneDNN's has (also per-row scales).
        options["backend"] = "onednn"
        log.warning("int8-dynamic: this CPU has no AVX512-VNNI, so the artifact records backend onednn (fast on "
                    "x86 CPUs; GPU nodes run its float weights); pass backend torchao for GPU / VNNI fleets")
    config = make_config(method, **options)
    record = to_record(method, config)
    if reason := cannot_run_here(record, device):
        raise ValueError(f"{method} cannot run on {device}: {reason}")
    if reason := slow_here(record, device):
        log.warning("%s. The check runs it at that speed; jobs and Serve on such a device run the float weights "
                    "(engine slow_compression: apply forces it)", reason)
    name, texts, gold = heldout_texts(data, limit, text_column, label_column)
    t0 = time.perf_counter()
    artifact = is_artifact(src_dir)
    if artifact:
        manifest = read_manifest(src_dir)
        if manifest.compression:
            raise ValueError(
                f"{model_dir!r} is already compressed ({manifest.compression.get('method')}); quantize its "
                f"float source instead ({manifest.compression.get('source', 'the artifact it was made from')})"
            )
        source, tok, _ = load_artifact(src_dir, device)
        target, _, _ = load_artifact(src_dir, device)
        apply(target, method, config)
        max_len = min(manifest.max_length, 512)
        s_final, s_label, s_layer = run_early_exit(source, tok, texts, manifest.thresholds, manifest.active, max_len)
        c_final, c_label, c_layer = run_early_exit(target, tok, texts, manifest.thresholds, manifest.active, max_len)
        result = check(s_final, c_final, gold, name, budget)
        ref = s_final.argmax(-1)
        result["exit_agreement"] = float((c_label == ref).float().mean())
        result["source_exit_agreement"] = float((s_label == ref).float().mean())
        result["mean_exit_layer"] = float(c_layer.float().mean())
        result["source_mean_exit_layer"] = float(s_layer.float().mean())
        if gold is not None:
            result["exit_accuracy"] = float((c_label.numpy() == gold).mean())
    else:
        if (src_dir / COMPRESSION_JSON).exists():
            raise ValueError(f"{model_dir!r} is already compressed ({COMPRESSION_JSON}); quantize its float source")
        tok = load_tokenizer(str(src_dir))
        source = load_classifier(str(src_dir)).to(device)
        target = apply(load_classifier(str(src_dir)).to(device), method, config)
        result = check(classifier_logits(source, tok, texts, 128), classifier_logits(target, tok, texts, 128), gold, name, budget)
    result["device"] = str(device)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    record = {**record, "source": str(model_dir), "check": result}
    if not result["within_budget"] and not allow_loss:
        raise BudgetExceeded(record)

    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, or a previous output of this command (checked above)
    # The source's validation feedback is the float ramps' output, not this model's (re-tuning writes its own).
    shutil.copytree(src_dir, out_dir, ignore=shutil.ignore_patterns(COMPRESSION_JSON, VALIDATION_FEEDBACK))
    if artifact:
        manifest = read_manifest(out_dir)
        manifest.compression = record
        write_manifest(out_dir, manifest)
        if retune:
            record = retune_thresholds(out_dir, src_dir, name, texts, ref.numpy(), result, device, progress)
    else:
        (out_dir / COMPRESSION_JSON).write_text(json.dumps(record, indent=2))
    return record


def retune_thresholds(out_dir: Path, src_dir: Path, check_name: str, check_texts: list[str],
                      check_reference: np.ndarray, check: dict, device: str = "cpu", progress=None) -> dict:
    """Re-tune a compressed artifact's exit thresholds against its float source's answers.

    The accuracy budget is against the original float model, and compression already spends part of
    it, so thresholds tuned for the float ramps overshoot (measured, int8: 98.9% agreement with the
    float model at the float thresholds). This records every ramp of the compressed model on the
    bootstrap's validation split, labels the rows with the float source's answers (its
    validation_feedback file when it has one), and runs the tuner with those as the reference (rows that
    never exit count as right only where the compressed final head agrees). Then the held-out rows of
    `check` (whose float answers are `check_reference`) are scored at the new thresholds. Returns the
    updated record.
    """
    from pipeline.config import EngineConfig
    from pipeline.control.deployment import cost_model
    from pipeline.control.replay import record as record_ramps
    from pipeline.control.tuner import evaluate, tune_thresholds
    from pipeline.engine.predictor import Predictor
    from pipeline.feedback import FeedbackWindow
    from pipeline.model.artifact import load_validation_feedback, read_manifest, save_validation_feedback, write_manifest
    from pipeline.training.bootstrap import validation_split

    manifest = read_manifest(out_dir)
    R = len(manifest.ramps)
    try:
        cfg, val = validation_split(manifest, where=str(src_dir))
    except ValueError as e:
        raise ValueError(f"{e}; or quantize with --no-retune") from e

    # Truncated as the bootstrap and the check truncated (the model's limit can be longer). The compressed
    # model's own numerics even where its kernels are slow: the thresholds are for the model as recorded.
    engine = {"device": device, "max_length": manifest.max_length, "slow_compression": "apply"}
    saved = load_validation_feedback(src_dir, num_ramps=R)
    if saved is not None and len(saved[2]) == len(val):
        src_val_final = saved[2]
    else:
        src_val_final = record_ramps(str(src_dir), val.texts, progress=progress, engine=engine).final
    compressed = Predictor(str(out_dir), EngineConfig(**engine))  # loaded (and compiled) once for both passes
    cmp_val = record_ramps(compressed, val.texts, progress=progress)
    window = FeedbackWindow(cmp_val.conf, cmp_val.pred, cmp_val.final, reference=src_val_final)
    costs = cost_model(manifest)
    constraint = manifest.constraint * cfg.tune_headroom
    tuned = tune_thresholds(window, costs, constraint=constraint)
    cmp_test = record_ramps(compressed, check_texts, progress=progress)
    held = evaluate(FeedbackWindow(cmp_test.conf, cmp_test.pred, cmp_test.final, reference=check_reference),
                    costs, tuned.thresholds, manifest.active)
    retune = {
        "data": f"{cfg.data}:validation",
        "rows": len(window),
        "constraint": constraint,
        "previous_thresholds": list(manifest.thresholds),
        "validation_final_agreement": float(window.final_ok.mean()),
        "validation_agreement": tuned.agreement,
        "validation_layer_savings": tuned.layer_savings,
        "check_data": check_name,
        "check_exit_agreement": held.agreement,
        "check_layer_savings": held.layer_savings,
        "check_exit_agreement_before": check["exit_agreement"],
        "check_layer_savings_before": 1.0 - check["mean_exit_layer"] / manifest.num_layers,
    }
    manifest.thresholds = [float(t) for t in tuned.thresholds]
    manifest.compression = {**manifest.compression, "retune": retune}
    write_manifest(out_dir, manifest)
    # The controller warm-starts from this file: it must hold the compressed model's outputs, not the source's.
    save_validation_feedback(out_dir, cmp_val.conf, cmp_val.pred, cmp_val.final)
    return manifest.compression
