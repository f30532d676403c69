"""The embedded default job: a real original model, its ramps, and the movie-review corpus classified."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np


def prepare_demo_model(workdir: Path, echo=print, progress=None) -> tuple[Path, Path]:
    """Fine-tune (once) and bootstrap (once); both are cached under workdir."""
    from pipeline.config import BootstrapConfig, FinetuneConfig
    from pipeline.training.bootstrap import bootstrap
    from pipeline.training.finetune import finetune

    model_dir, ee_dir = workdir / "minilm-movie", workdir / "minilm-movie-ee"
    if not (model_dir / "eval.json").exists():
        echo(f"[1/3] fine-tuning MiniLM-L6 on movie reviews -> {model_dir} (about 6 minutes on 2 cores)")
        report = finetune(str(model_dir), FinetuneConfig(), progress=progress and progress("finetune step"))
        echo(f"      test accuracy {report['test_accuracy']:.3f} in {report['train_seconds']:.0f} s")
    else:
        echo(f"[1/3] original model cached at {model_dir}")
    if not (ee_dir / "manifest.json").exists():
        echo(f"[2/3] bootstrapping ramps -> {ee_dir}")
        bootstrap(str(model_dir), str(ee_dir), BootstrapConfig(), progress=progress and progress("caching features"))
    else:
        echo(f"[2/3] early-exit artifact cached at {ee_dir}")
    from pipeline.inspect_artifact import inspect_table

    echo(inspect_table(str(ee_dir)))
    return model_dir, ee_dir


def run_demo(workdir: Path, echo=print, progress=None) -> dict:
    from pipeline.data.datasets import load_dataset
    from pipeline.engine.predictor import Predictor

    _, ee_dir = prepare_demo_model(workdir, echo, progress)
    test = load_dataset("movie-reviews").split("test")
    echo(f"[3/3] classifying {len(test)} held-out movie-review sentences (exit mode, local)")
    predictor = Predictor(str(ee_dir))
    t = time.perf_counter()
    out = predictor.predict(test.texts)
    seconds = time.perf_counter() - t
    labels = np.array([p.label_id for p in out.predictions])
    exits = np.bincount([p.exit_layer for p in out.predictions], minlength=predictor.model.num_layers + 1)
    summary = {
        "rows": len(test),
        "rows_per_s": round(len(test) / seconds, 1),
        "gold_accuracy": round(float((labels == test.labels).mean()), 4),
        "exits_per_layer": {str(i): int(c) for i, c in enumerate(exits) if i > 0},
        "mean_exit_layer": round(float(np.mean([p.exit_layer for p in out.predictions])), 2),
        "errors": out.stats["errors"],
    }
    echo(json.dumps(summary, indent=2))
    return summary
