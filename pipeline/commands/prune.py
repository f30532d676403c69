"""Click commands `offramp prune` and `offramp bench pruning` (registered by pipeline.cli). Thin: parse, validate,
call the library, print; heavy imports stay inside the commands."""
from __future__ import annotations

import json

import click

from pipeline.commands.progress import progress


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _share(value: str | None, name: str) -> float | None:
    if value is None:
        return None
    try:
        share = float(value.rstrip("%")) / (100 if value.endswith("%") else 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a share, e.g. 0.5 or 50%", param_hint=name) from None
    if not 0 <= share < 1:
        raise click.BadParameter(f"{value!r}: the share of each layer's units to remove must be in [0, 1)",
                                 param_hint=name)
    return share


@click.command()
@click.option("--model", "model_dir", required=True, help="The early-exit artifact whose original model is pruned.")
@click.option("--out", required=True, help="The pruned artifact: a new directory or a URL (s3://...).")
@click.option("--ffn", default=None, help="Share of each layer's feed-forward neurons to remove, e.g. 0.5 or 50%.")
@click.option("--heads", default=None, help="Share of each layer's attention heads to remove (decoder families; "
                                            "encoder configs cannot state fewer heads: the command says why).")
@click.option("--max-agreement-loss", type=float, default=None,
              help="Instead of shares: the largest pruning whose agreement loss against the original on the "
                   "validation split stays within this (e.g. 0.005), searched over 10%..90%.")
@click.option("--scope", default="layer", show_default=True, type=click.Choice(["layer", "global"]),
              help="layer: every layer loses the same share (global is refused: configs hold one width).")
@click.option("--recover-steps", default=300, show_default=True, type=click.IntRange(0),
              help="Distillation steps from the original's outputs after pruning (0: none).")
@click.option("--ramps", default="rebootstrap", show_default=True, type=click.Choice(["rebootstrap", "keep"]),
              help="Train new ramps on the pruned model, or keep the source's; thresholds re-tuned either way.")
@click.option("--budget", default=0.01, show_default=True, type=float,
              help="Largest agreement loss against the original in the held-out check (with --ffn / --heads).")
@click.option("--allow-loss", is_flag=True, help="Write the artifact even when the check is over budget.")
@click.option("--data", default=None, help="Importance and recovery corpus (no labels needed); default: the "
                                           "artifact's bootstrap corpus.")
@click.option("--text-column", default=None, help="Text column of --data / --check-data (default: text).")
@click.option("--check-data", default=None, help="Held-out check rows: a built-in (its test split) or a file. "
                                                 "Default: the bootstrap corpus's test split (a built-in) or validation split.")
@click.option("--check-limit", default=None, type=click.IntRange(1), help="Check on only the first N rows.")
@click.option("--importance-rows", default=1024, show_default=True, type=click.IntRange(1))
@click.option("--learning-rate", default=1e-4, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
def prune(model_dir, out, ffn, heads, max_agreement_loss, scope, recover_steps, ramps, budget, allow_loss, data,
          text_column, check_data, check_limit, importance_rows, learning_rate, batch_size, device):
    """Structured pruning of an artifact's original model (attention heads, feed-forward neurons): importance from
    the model's own outputs, a short recovery by distillation, a check against the float original, new ramps and
    thresholds. The pruned model loads with plain from_pretrained; the artifact names the original, so jobs on it
    certify against the unpruned model. Exits non-zero when the check is over --budget (unless --allow-loss)."""
    from pydantic import ValidationError

    from pipeline.training.prune import BudgetExceeded, PruneConfig, prune_artifact

    ffn_share, heads_share = _share(ffn, "--ffn"), _share(heads, "--heads")
    if max_agreement_loss is None and not (ffn_share or heads_share):
        raise click.UsageError("give --ffn and/or --heads (shares to remove, e.g. --ffn 0.5), or "
                               "--max-agreement-loss (e.g. 0.005) to search the largest pruning within it")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.ClickException(f"--device {device}: torch sees no CUDA here; use --device cpu")
    try:
        cfg = PruneConfig(ffn=ffn_share, heads=heads_share, max_agreement_loss=max_agreement_loss, scope=scope,
                          recover_steps=recover_steps, ramps=ramps, budget=budget, allow_loss=allow_loss, data=data,
                          text_column=text_column, check_data=check_data, check_limit=check_limit,
                          importance_rows=importance_rows, learning_rate=learning_rate, batch_size=batch_size,
                          device=device)
        from pipeline.data.cache import local_path
        from pipeline.data.storage import staged_dir

        original = None
        if "://" in str(out):  # the artifact travels: name the source as the user named it
            original = model_dir if "://" in str(model_dir) else str(__import__("pathlib").Path(model_dir).resolve())
        elif "://" in str(model_dir):
            original = model_dir
        with staged_dir(out) as local:  # a URL: written here, then uploaded
            record = prune_artifact(local_path(model_dir), local, cfg, progress=progress, original=original)
    except ValidationError as e:
        raise click.ClickException(f"bad prune option: {e.errors()[0]['loc']}: {e.errors()[0]['msg']}") from e
    except BudgetExceeded as e:
        click.echo(json.dumps(e.record["check"], indent=2))
        raise click.ClickException(str(e)) from e
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # PruningRefused is a ValueError
        raise click.ClickException(str(e)) from e
    c = record["check"]
    click.echo(json.dumps(c, indent=2))
    w0, w1 = record["widths_before"], record["widths_after"]
    kinds = [f"ffn {w0['ffn']} -> {w1['ffn']} neurons per layer"]
    if "heads" in w0:
        kinds.append(f"heads {w0['heads']} -> {w1['heads']} per layer")
    status = "within" if c["within_budget"] else "OVER (kept: --allow-loss)"
    acc = f", gold accuracy {_pct(c['accuracy'])} vs {_pct(c['source_accuracy'])}" if c.get("accuracy") is not None else ""
    click.echo(f"pruned {', '.join(kinds)} ({record['params_before'] / 1e6:.1f}M -> {record['params_after'] / 1e6:.1f}M "
               f"parameters), recovered {record['recovery']['steps']} steps: agreement {_pct(c['agreement'])} with "
               f"the original on {c['rows']} rows of {c['data']} (loss {_pct(c['agreement_loss'])}, {status} budget "
               f"{_pct(c['budget'])}){acc}; wrote {out}", err=True)
    r = record["ramps"]
    click.echo(f"ramps {r['mode']}: at thresholds tuned against the original, early-exit agreement "
               f"{_pct(r['check_exit_agreement'])} on {r['check_data']}, layer savings {_pct(r['check_layer_savings'])}",
               err=True)


MODES = ("plain", "full", "exits")  # pipeline.bench.pruning_bench.MODE_NAMES


@click.command("pruning")
@click.option("--model", "source", default="artifacts/minilm-movie-ee", show_default=True,
              help="The unpruned artifact (the baseline).")
@click.option("--pruned", multiple=True, required=True, help="A pruned artifact of it (`offramp prune`); repeat.")
@click.option("--dataset", default="movie-reviews", show_default=True)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--limit", default=None, type=int, help="Use a sample of N rows.")
@click.option("--dtypes", default="float32", show_default=True, help="Comma-separated: float32,bfloat16.")
@click.option("--modes", default="plain,full,exits", show_default=True,
              help="plain (transformers), full (offramp, ramps closed), exits (offramp, tuned thresholds).")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(1), help="Interleaved rounds; best kept.")
@click.option("--out", "out_json", default="bench_results/pruning.json", show_default=True)
def bench_pruning(source, pruned, dataset, split, limit, dtypes, modes, reps, out_json):
    """An artifact and its pruned versions side by side: rows/s at full depth and with exits, agreement with the
    float original, gold accuracy; the unpruned artifact measured in the same run, passes interleaved."""
    from pipeline.bench.pruning_bench import run_pruning_bench

    bad = set(modes.split(",")) - set(MODES)
    if bad:
        raise click.BadParameter(f"unknown mode(s) {sorted(bad)}; use {', '.join(MODES)}", param_hint="--modes")
    try:
        run_pruning_bench(source, list(pruned), dataset, split, limit, tuple(dtypes.split(",")),
                          tuple(modes.split(",")), reps, out_json=out_json, echo=click.echo)
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
