"""`offramp quantize`: compress a classifier or an early-exit artifact, check it, record the check.

The output keeps the source's float safetensors weights (no pickle, no packed tensors) and records
the method and the check; loading re-applies the method (`load_artifact` for an artifact, skipping it
where its kernels are slow unless asked; `load_compressed_classifier` for a classifier directory with
`compression.json`).

The check (compression_check.py) runs the compressed model and its uncompressed source on the same held-out
rows; for an artifact, the exit thresholds are then re-tuned for the compressed model (pipeline.control.retune).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from pipeline.compression.capability import cannot_run_here, slow_here
from pipeline.compression.registry import apply, make_config, to_record
from pipeline.model.classify import classifier_logits
from pipeline.model.heads import head_from_scores
from pipeline.training.compression_check import BudgetExceeded, check, check_artifact, heldout_texts

log = logging.getLogger(__name__)

COMPRESSION_JSON = "compression.json"


def _previous_output(path: Path) -> bool:
    if (path / COMPRESSION_JSON).exists():
        return True
    try:
        return bool(json.loads((path / "manifest.json").read_text()).get("compression"))
    except (OSError, ValueError):
        return False


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").exists()


def load_compressed_classifier(path: str, device: str = "cpu"):
    """An HF classifier with its directory's `compression.json` (if any) re-applied."""
    from pipeline.model.artifact import load_classifier

    model = load_classifier(path).to(device)
    rec = Path(path) / COMPRESSION_JSON
    if rec.exists():
        apply(model, json.loads(rec.read_text()))
    return model


def quantize(model_dir: str, out: str, method: str, data: str = "movie-reviews", budget: float = 0.01,
             allow_loss: bool = False, limit: int | None = None, device: str = "cpu",
             options: dict | None = None, text_column: str = "text", label_column: str = "label",
             retune: bool = True, progress=None) -> dict:
    """Compress `model_dir` (artifact or classifier dir) with `method`, check it, write `out`.

    int8-dynamic without a `backend` option uses the registry's default (torchao) where it is fast and
    onednn on a CPU without AVX512-VNNI. Returns the record written: {"method", "config", "source",
    "check"[, "retune"]}. Raises BudgetExceeded (writing nothing) when the agreement loss is over `budget`
    and not `allow_loss`. For an artifact with `retune`, the exit thresholds are re-tuned for the
    compressed model (pipeline.control.retune).
    """
    from pipeline.control.retune import retune_thresholds
    from pipeline.engine.loader import load_artifact
    from pipeline.model.artifact import (
        VALIDATION_FEEDBACK,
        artifact_dir,
        load_classifier,
        load_tokenizer,
        original_of,
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
        # A pruned source names its float original: the budget is against it, so the retune's reference is its answers
        original = original_of(src_dir)
        original = artifact_dir(original) if "://" in original else Path(original)  # a URL: this node's copy
        orig = None
        if original.resolve() != src_dir.resolve():
            orig_hf = load_classifier(str(original / "model")).to(device)
            orig = source.head_kind.decide(classifier_logits(orig_hf, tok, texts, min(manifest.max_length, 512))).answer
        result, ref = check_artifact(source, target, tok, manifest, texts, gold, name, budget, orig)
        if orig is not None:
            result["original"], ref = str(original), orig.numpy()
    else:
        if (src_dir / COMPRESSION_JSON).exists():
            raise ValueError(f"{model_dir!r} is already compressed ({COMPRESSION_JSON}); quantize its float source")
        tok = load_tokenizer(str(src_dir))
        source = load_classifier(str(src_dir)).to(device)
        target = apply(load_classifier(str(src_dir)).to(device), method, config)
        source_logits = classifier_logits(source, tok, texts, 128)
        result = check(source_logits, classifier_logits(target, tok, texts, 128), gold, name, budget,
                       head_from_scores(source.config, source_logits))
    result["device"] = str(device)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    record = {**record, "source": str(model_dir), "check": result}
    if not result["within_budget"] and not allow_loss:
        raise BudgetExceeded(record, record["method"], "the uncompressed model",
                             "Raise --budget or pass --allow-loss to keep it anyway")

    if out_dir.exists():
        shutil.rmtree(out_dir)  # empty, or a previous output of this command (checked above)
    # The source's validation feedback is the float ramps' output, not this model's (re-tuning writes its own).
    shutil.copytree(src_dir, out_dir, ignore=shutil.ignore_patterns(COMPRESSION_JSON, VALIDATION_FEEDBACK))
    if artifact:
        manifest = read_manifest(out_dir)
        manifest.compression = record
        if manifest.original and "://" not in manifest.original and not Path(manifest.original).is_absolute():
            # relative to the artifact: from its new place
            manifest.original = os.path.relpath((src_dir / manifest.original).resolve(), out_dir.resolve())
        write_manifest(out_dir, manifest)
        if retune:  # against the float original's answers (a pruned source's original, else the source)
            record = retune_thresholds(out_dir, original, name, texts, ref, result, device, progress)
    else:
        (out_dir / COMPRESSION_JSON).write_text(json.dumps(record, indent=2))
    return record
