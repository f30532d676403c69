"""Re-tuning a compressed artifact's exit thresholds against its float source: compression spends part of the
accuracy budget, so thresholds tuned for the float ramps overshoot it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig
from pipeline.control.deployment import cost_model
from pipeline.control.tuner import evaluate, tune_thresholds
from pipeline.engine.predictor import Predictor
from pipeline.engine.ramp_outputs import record_ramps
from pipeline.feedback import FeedbackWindow
from pipeline.model.artifact import load_validation_feedback, read_manifest, save_validation_feedback, write_manifest
from pipeline.training.bootstrap import validation_split


def retune_thresholds(out_dir: Path, src_dir: Path, check_name: str, check_texts: list[str],
                      check_reference: np.ndarray, check: dict, device: str = "cpu", progress=None) -> dict:
    """Re-tune a compressed artifact's exit thresholds against its float source's answers.

    The accuracy budget is against the original float model, and compression already spends part of
    it. This records every ramp of the compressed model on the
    bootstrap's validation split, labels the rows with the float source's answers (its
    validation_feedback file when it has one), and runs the tuner with those as the reference (rows that
    never exit count as right only where the compressed final head agrees). Then the held-out rows of
    `check` (whose float answers are `check_reference`) are scored at the new thresholds. Returns the
    updated record.
    """
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
