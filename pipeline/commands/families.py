"""Click command `offramp bench families` (registered by pipeline.cli); heavy imports stay inside it."""
from __future__ import annotations

import click


@click.command("families")
@click.option("--families", default=None, help="Comma-separated, e.g. bert,llama. Default: one model of every family "
              "module (bert, distilbert, roberta, deberta_v2, modernbert, electra, albert, mpnet, llama, qwen2, qwen3, "
              "mistral, gemma); gemma2 and gemma3_text by name.")
@click.option("--max-steps", default=600, show_default=True, type=click.IntRange(1),
              help="Fine-tuning steps (batch 32) from random weights per family.")
@click.option("--layers", default=6, show_default=True, type=click.IntRange(2))
@click.option("--hidden", default=128, show_default=True, type=click.IntRange(64))
@click.option("--config", default="configs/jobs/movie_reviews.yaml", show_default=True, help="Job YAML to run.")
@click.option("--cache", default="artifacts/families", show_default=True,
              help="Fine-tuned models and their ramps, kept so that a rerun skips training.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="Torch threads for fine-tuning, bootstrap and verify in this process.")
@click.option("--out", "out_json", default="bench_results/families.json", show_default=True)
def bench_families(families, max_steps, layers, hidden, config, cache, threads, out_json):
    """Per family: a small model trained here from random weights, its ramps, the certified job on the movie-review
    corpus and verify on every row (layer work saved, the certificate, the true agreement)."""
    from pipeline.bench.families_bench import FAMILIES, run_families_bench

    try:
        result = run_families_bench(families or ",".join(FAMILIES), max_steps, layers, hidden, config, cache, out_json,
                                    threads, echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    if result["failures"]:
        raise click.ClickException(f"failed: {', '.join(result['failures'])} (see the JSON's failures)")
