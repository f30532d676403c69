"""Click commands `offramp distill`, `offramp quantize` and `offramp bench compression`.

Thin: parse, validate, call the library, print. Heavy imports stay inside the commands. Registered
by pipeline.cli: `main.add_command(distill)`, `main.add_command(quantize)`, `bench.add_command(bench_compression)`.
"""
from __future__ import annotations

import json

import click

from pipeline.commands.progress import progress
from pipeline.config import COMPRESSION_METHODS as METHODS  # light: config imports no torch

INT8_BACKENDS = ("torchao", "onednn", "torch-ao")  # transforms.INT8_BACKENDS (a test keeps them equal)


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of layer indices, e.g. 0,2,4") from None


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


@click.command()
@click.option("--teacher", required=True, help="The teacher classifier directory (AutoModelForSequenceClassification).")
@click.option("--keep-layers", default=None, help="Teacher layers (0-based) the student keeps, e.g. 0,2,4.")
@click.option("--num-layers", default=None, type=int, help="Or: keep this many layers, spread evenly (6 -> 3 keeps 0,2,4).")
@click.option("--data", default="movie-reviews", show_default=True, help="Built-in dataset name or parquet/jsonl/csv path/URL.")
@click.option("--out", required=True, help="Where to save the student classifier: a directory or a URL (s3://...).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--temperature", default=2.0, show_default=True, type=float)
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Weight of the soft-target loss (rest: hard labels).")
@click.option("--epochs", default=3.0, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--learning-rate", default=1e-4, show_default=True, type=float)
@click.option("--max-steps", default=None, type=int, help="Stop after N steps (smoke runs).")
@click.option("--limit", default=None, type=int, help="Use only the first N training rows.")
@click.option("--eval-limit", default=None, type=int, help="Check on only the first N held-out rows.")
def distill(teacher, keep_layers, num_layers, data, out, text_column, label_column, temperature, alpha, epochs,
            batch_size, learning_rate, max_steps, limit, eval_limit):
    """Distill a student that keeps a subset of the teacher's layers (DistilBERT recipe), then report
    its agreement with the teacher and gold accuracy on held-out data."""
    from pydantic import ValidationError

    from pipeline.training.distill import REPORT, DistillConfig
    from pipeline.training.distill import distill as run

    if (keep_layers is None) == (num_layers is None):
        raise click.UsageError("give exactly one of --keep-layers (e.g. 0,2,4) or --num-layers (e.g. 3)")
    try:
        cfg = DistillConfig(keep_layers=_layers(keep_layers), num_layers=num_layers, data=data,
                            text_column=text_column, label_column=label_column, temperature=temperature,
                            alpha=alpha, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                            max_steps=max_steps, limit=limit, eval_limit=eval_limit)
        from pipeline.data.cache import local_path
        from pipeline.data.storage import staged_dir

        with staged_dir(out) as local:  # a URL: written here, then uploaded
            report = run(local_path(teacher), local, cfg, progress=progress("distill step"))
    except ValidationError as e:
        raise click.ClickException(f"bad distill option: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from e
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report, indent=2))
    drop = report.get("accuracy_drop")
    click.echo(
        f"DISTILLED {report['teacher_layers']} -> {report['student_layers']} layers (kept {report['keep_layers']}): "
        f"agreement with teacher {_pct(report['agreement_with_teacher'])}, gold accuracy "
        f"{_pct(report['student_accuracy'])} vs teacher {_pct(report['teacher_accuracy'])}"
        + (f" ({100 * drop:+.2f} points lost)" if drop is not None else "")
        + f" on {report['heldout_rows']} held-out rows; report in {out}/{REPORT}",
        err=True,
    )


@click.command()
@click.option("--model", "model_dir", required=True, help="An early-exit artifact or a classifier directory.")
@click.option("--method", required=True, type=click.Choice(METHODS), help="Compression method.")
@click.option("--out", required=True, help="Output directory or URL (same kind as --model).")
@click.option("--data", default="movie-reviews", show_default=True,
              help="Check data: a built-in dataset (its test split) or a parquet/jsonl/csv path/URL (all rows).")
@click.option("--budget", default=0.01, show_default=True, type=float, help="Largest allowed agreement loss vs the source.")
@click.option("--allow-loss", is_flag=True, help="Write the output even when the check is over budget.")
@click.option("--limit", default=None, type=int, help="Check on only the first N rows.")
@click.option("--device", default="cpu", show_default=True, help="Where to run the check: cpu or cuda.")
@click.option("--backend", default=None, type=click.Choice(INT8_BACKENDS),
              help="int8-dynamic implementation: torchao (fast with AVX512-VNNI), onednn (fast on AVX2-only "
                   "CPUs too), torch-ao (lossy). Default: torchao, or onednn on a CPU without AVX512-VNNI.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--retune/--no-retune", default=True, show_default=True,
              help="Artifacts: re-tune the exit thresholds for the compressed model against the float source's answers.")
def quantize(model_dir, method, out, data, budget, allow_loss, limit, device, backend, text_column, label_column, retune):
    """Compress a model (int8-dynamic, fp16, bf16), check it against the uncompressed source on held-out
    data, and record the check. Exits non-zero when agreement loss > --budget (unless --allow-loss)."""
    from pipeline.training.quantize import BudgetExceeded
    from pipeline.training.quantize import quantize as run

    if backend and method != "int8-dynamic":
        raise click.UsageError(f"--backend applies to int8-dynamic only, not --method {method}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device}: torch sees no CUDA here; use --device cpu")
    try:
        from pipeline.data.cache import local_path
        from pipeline.data.storage import staged_dir

        with staged_dir(out) as local:  # a URL: written here, then uploaded (manifest.json last)
            record = run(local_path(model_dir), local, method, data=data, budget=budget, allow_loss=allow_loss,
                         limit=limit, device=device, options={"backend": backend} if backend else None,
                         text_column=text_column, label_column=label_column, retune=retune)
    except BudgetExceeded as e:
        click.echo(json.dumps(e.record["check"], indent=2))
        raise click.ClickException(str(e)) from e
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
    c = record["check"]
    click.echo(json.dumps(c, indent=2))
    status = "within" if c["within_budget"] else "OVER (kept: --allow-loss)"
    acc = f", gold accuracy {_pct(c['accuracy'])} vs {_pct(c['source_accuracy'])}" if c.get("accuracy") is not None else ""
    click.echo(f"{method}: agreement {_pct(c['agreement'])} with the uncompressed model on {c['rows']} rows of "
               f"{c['data']} (loss {_pct(c['agreement_loss'])}, {status} budget {_pct(c['budget'])}){acc}; "
               f"wrote {out}", err=True)
    if rt := record.get("retune"):
        click.echo(f"re-tuned thresholds on {rt['rows']} rows of {rt['data']}: early-exit agreement with the float "
                   f"source on {rt['check_data']} {_pct(rt['check_exit_agreement_before'])} -> "
                   f"{_pct(rt['check_exit_agreement'])}, layer savings {_pct(rt['check_layer_savings_before'])} -> "
                   f"{_pct(rt['check_layer_savings'])}", err=True)


@click.command("compression")
@click.option("--teacher", required=True, help="The float original classifier directory.")
@click.option("--artifact", default=None, help="Its early-exit artifact (default: bootstrap one under --workdir).")
@click.option("--workdir", default="artifacts/compression", show_default=True, type=click.Path(file_okay=False),
              help="Where the distilled student and bootstrapped artifacts are built and cached.")
@click.option("--dataset", default="movie-reviews", show_default=True)
@click.option("--limit", default=None, type=int, help="Use only the first N test rows.")
@click.option("--reps", default=3, show_default=True, type=int, help="Timed passes per row (best is kept).")
@click.option("--distill-epochs", default=3.0, show_default=True, type=float)
@click.option("--out", "out_json", default="bench_results/compression.json", show_default=True)
def bench_compression(teacher, artifact, workdir, dataset, limit, reps, distill_epochs, out_json):
    """Original vs int8 vs distilled vs distilled+int8, each without and with ramps: rows/s, agreement, accuracy."""
    from pipeline.bench.compression_bench import run_compression_bench

    try:
        run_compression_bench(teacher, artifact=artifact, workdir=workdir, dataset=dataset, limit=limit, reps=reps,
                              distill_epochs=distill_epochs, out_json=out_json, echo=click.echo)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        raise click.ClickException(str(e)) from e
