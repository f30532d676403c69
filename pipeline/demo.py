"""The embedded default job: a real original model, its ramps, and the movie-review corpus classified."""
from __future__ import annotations

import json
import time
from pathlib import Path


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


def run_demo(workdir: Path, echo=print, progress=None, config: str = "configs/jobs/movie_reviews.yaml") -> dict:
    """Prepare the model (cached), then run the offline job on an embedded local Ray."""
    import shutil

    import pyarrow.parquet as pq

    from pipeline.config import JobConfig
    from pipeline.offline.job import run_job

    _, ee_dir = prepare_demo_model(workdir, echo, progress)
    cfg = JobConfig.from_yaml(config, model=str(ee_dir))
    if "://" not in cfg.output.url:
        shutil.rmtree(cfg.output.url, ignore_errors=True)  # the demo's own output: start clean
        if cfg.controller.checkpoint_url and "://" not in cfg.controller.checkpoint_url:
            Path(cfg.controller.checkpoint_url).unlink(missing_ok=True)  # and its controller: no stale state
    echo(f"[3/3] offramp run {config}: the movie-review corpus through the early-exit actor pool on a local Ray")
    t = time.perf_counter()
    summary = run_job(cfg, echo=echo)
    if "gold_label" in cfg.input.passthrough:  # the gold label rode along: report accuracy too
        out = pq.read_table(cfg.output.url, columns=["label", "gold_label"]).to_pydict()
        summary["gold_accuracy"] = round(sum(a == b for a, b in zip(out["label"], out["gold_label"])) / len(out["label"]), 4)
    summary["wall_seconds_with_ray_start"] = round(time.perf_counter() - t, 1)
    echo(json.dumps(summary, indent=2))
    echo(f"predictions: {cfg.output.url}/part-*.parquet")
    return summary
