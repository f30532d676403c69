"""The `offramp` command. Thin: parse, validate, call the library. Heavy imports stay inside commands."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from pipeline.commands.progress import progress

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from e


def _local(path: str) -> str:
    """A model given as a URL (s3://, gs://, ...): this machine's cached copy (pipeline.data.cache)."""
    from pipeline.data.cache import local_path

    return local_path(path)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """offramp: early-exit batch inference for transformer text classifiers on Ray."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers reads these when it is first imported (here and in the Ray workers this process starts); not
    # importing it to set them keeps ~0.4 s off every command that needs no model (a job's driver among them)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # transformers imports torchao on every model load; its optional CUDA kernels warn on CPU boxes
    logging.getLogger("torchao").setLevel(logging.ERROR)


@main.command()
@click.option("--base", default="minilm-l6", show_default=True, help="minilm-l6 (packaged), a local HF model dir, or a hub id.")
@click.option("--dataset", default="movie-reviews", show_default=True,
              help="movie-reviews, trec, movie-reviews-score (regression 0-5), movie-reviews-reactions (multi-label), "
              "... or a parquet/jsonl/csv path/URL.")
@click.option("--out", required=True, help="Where to save the classifier: a directory or a URL (s3://...).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--problem-type", default="auto", show_default=True,
              type=click.Choice(["auto", "single_label_classification", "regression", "multi_label_classification"]),
              help="The head: one class per row, a numeric score, or a set of labels (the label column holds a list "
              "of names, or a string of them separated by commas). auto: a built-in's own, a file's single-label.")
@click.option("--epochs", default=1.0, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int)
@click.option("--learning-rate", default=5e-5, show_default=True, type=float)
@click.option("--max-steps", default=None, type=int, help="Stop after N steps (smoke runs).")
@click.option("--limit", default=None, type=int, help="Use only N training rows (a random sample).")
def finetune(base, dataset, out, text_column, label_column, problem_type, epochs, batch_size, learning_rate, max_steps,
             limit):
    """Fine-tune an original classifier (AutoModelForSequenceClassification) on a labelled dataset."""
    from pipeline.config import FinetuneConfig
    from pipeline.training.finetune import finetune as run

    try:
        cfg = FinetuneConfig(base=base, dataset=dataset, text_column=text_column, label_column=label_column,
                             problem_type=problem_type, epochs=epochs, batch_size=batch_size,
                             learning_rate=learning_rate, max_steps=max_steps, limit=limit)
        from pipeline.data.storage import staged_dir

        with staged_dir(out) as local:  # a URL: written here, then uploaded
            report = run(local, cfg, progress=progress("finetune step"))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    click.echo(json.dumps(report, indent=2))


@main.command()
@click.option("--model", "model_dir", required=True, help="The original classifier: a directory or a URL.")
@click.option("--data", default="movie-reviews", show_default=True, help="Bootstrap corpus: built-in name or path/URL (no labels needed).")
@click.option("--out", required=True, help="Early-exit artifact: a directory or a URL (s3://...).")
@click.option("--text-column", default="text", show_default=True)
@click.option("--pooling", type=click.Choice(["auto", "mean", "cls", "last"]), default="auto", show_default=True,
              help="How ramps pool a layer's tokens; auto: mean for encoders, the last real token for decoders.")
@click.option("--constraint", default=0.01, show_default=True, type=float, help="Accuracy budget for initial thresholds.")
@click.option("--epochs", default=30, show_default=True, type=int)
@click.option("--limit", default=None, type=int, help="Use only N rows (a random sample).")
@click.option("--bins", default=None, help="A regression head's bin values, e.g. 0,1,2,3,4,5 (default: the rounded "
              "integers over the range of its scores on --data).")
@click.option("--label-threshold", default=0.5, show_default=True, type=float,
              help="A multi-label head's cut: a label is on when its sigmoid is at least this.")
def bootstrap(model_dir, data, out, text_column, pooling, constraint, epochs, limit, bins, label_threshold):
    """Train a ramp after every layer by distillation from the frozen original model."""
    from pipeline.config import BootstrapConfig
    from pipeline.training.bootstrap import bootstrap as run

    try:
        values = None if bins is None else [float(x) for x in bins.split(",") if x.strip()]
        cfg = BootstrapConfig(data=data, text_column=text_column, pooling=pooling, constraint=constraint,
                              epochs=epochs, limit=limit, regression_bins=values, label_threshold=label_threshold)
        from pipeline.data.storage import staged_dir

        with staged_dir(out) as local:  # a URL: written here, then uploaded (manifest.json last)
            run(_local(model_dir), local, cfg, progress=progress("caching features"))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    _print_inspect(out)


@main.command()
@click.option("--model", "model_dir", required=True, help="Early-exit artifact directory.")
@click.option("--input", "input_url", default=None, help="parquet/jsonl/csv path or URL instead of TEXTS.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--mode", type=click.Choice(["exit", "release"]), default="exit", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.argument("texts", nargs=-1)
def predict(model_dir, input_url, text_column, mode, as_json, texts):
    """Classify TEXTS (or --input) locally, no Ray: label, score and exit layer per input."""
    from pipeline.config import EngineConfig
    from pipeline.engine.predictor import Predictor

    if bool(texts) == bool(input_url):
        raise click.UsageError("give either TEXTS or --input, not both or neither")
    try:
        if input_url:
            from pipeline.data.readers import read_table, require_columns

            table = read_table(input_url)
            require_columns(table, [text_column], input_url)
            texts = table.column(text_column).to_pylist()
        predictor = Predictor(model_dir, EngineConfig(mode=mode))
        out = predictor.predict(list(texts))
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    for text, p in zip(texts, out.predictions):
        if as_json:
            click.echo(json.dumps({"text": text, **p.to_dict()}))
        elif p.error:
            click.echo(f"ERROR  {p.error}  | {str(text)[:60]!r}")
        else:
            flag = " (truncated)" if p.truncated else ""
            click.echo(f"{p.label:<12} {p.score:.3f}  exit {p.exit_layer}/{predictor.model.num_layers}{flag}  | {text[:60]}")
    if any(p.error for p in out.predictions):
        sys.exit(2)


def _print_inspect(path: str) -> None:
    from pipeline.inspect_artifact import inspect_table

    click.echo(inspect_table(path))


@main.command("validation-feedback")
@click.argument("artifact", type=click.Path(exists=True, file_okay=False))
@click.option("--data", default=None, help="Bootstrap data (default: the manifest's).")
def validation_feedback(artifact, data):
    """Add validation_feedback.safetensors (every ramp's output on the bootstrap validation split, a fresh
    controller's first tuning rows) to an artifact made before `offramp bootstrap` wrote it."""
    from pipeline.training.bootstrap import write_validation_feedback

    try:
        click.echo(json.dumps(write_validation_feedback(artifact, data), indent=1))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@main.command()
@click.argument("artifact")
def inspect(artifact):
    """Per-ramp table: layer, validation agreement, exit rate at the current thresholds, cost."""
    try:
        _print_inspect(artifact)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


def _job_config(config, **overrides):
    from pydantic import ValidationError

    from pipeline.config import JobConfig

    try:
        return JobConfig.from_yaml(config, **overrides)
    except ValidationError as e:
        raise click.ClickException(f"{config}: {e}") from e
    except (ValueError, FileNotFoundError) as e:
        _fail(e)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--input", "input_url", default=None, help="Override input.url.")
@click.option("--output", "output_url", default=None, help="Override output.url.")
@click.option("--model", "model", default=None, help="Override model.")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. ray://head:10001 or auto); default: embedded local Ray.")
@click.option("--resume", is_flag=True, default=None, help="Finish an interrupted job: keep finished parts.")
@click.option("--allow-uncertified", is_flag=True, help="Exit 0 even when the agreement interval's lower end "
              "is under the promise (certify.on_uncertified: warn).")
@click.option("--repair", is_flag=True, help="Bring a finished job's output within its promise: re-run the "
              "early-exit rows of the parts its certificate names through the original model, then audit the rest afresh.")
@click.option("--repair-parts", default=None, help="With --repair: these parts (shard numbers, e.g. 3,7, or all) instead.")
def run(config, input_url, output_url, model, address, resume, allow_uncertified, repair, repair_parts):
    """Run an offline batch-inference job on Ray (embedded local Ray unless --address).

    Exit status 3: the job finished but its output's agreement with the original model is not certified
    (the interval's lower end is under 1 - constraint); the summary names the parts where it fell short."""
    from pipeline.offline.job import JobError, format_summary, repair_job, run_job

    overrides = {"input.url": input_url, "output.url": output_url, "model": model, "resume": resume,
                 "certify.on_uncertified": "warn" if allow_uncertified else None}
    cfg = _job_config(config, **overrides)
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        if repair or repair_parts:
            parts = (repair_parts if repair_parts in (None, "all") else
                     [int(x) for x in repair_parts.split(",") if x.strip()])
            summary = repair_job(cfg, parts, address=address, echo=echo)
        else:
            summary = run_job(cfg, address=address, echo=echo)
    except (JobError, ValueError, FileNotFoundError) as e:
        _fail(e)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: the job's Ray is stopped by now; parts are only written whole
        kept = ("the summary is unchanged" if repair or repair_parts
                else "finished shards are kept: run the same command with --resume to finish the rest")
        click.echo(f"offramp: interrupted; {kept}", err=True)
        sys.exit(128 + getattr(e, "signum", 2))  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    click.echo(format_summary(summary))
    _check_certificate(summary, cfg.certify.on_uncertified)


def _check_certificate(summary: dict, on_uncertified: str) -> None:
    """Say what the certificate says; exit 3 when the promise is not certified and the user did not allow it."""
    from pipeline.offline.certificate import describe, describe_cost

    cert = summary.get("certificate")
    if not cert:
        return
    click.echo(describe(cert), err=True)
    if cost := describe_cost(cert):
        click.echo(cost, err=True)
    if cert["certified"]:
        return
    parts = cert.get("parts_with_disagreements") or []
    click.secho(
        f"offramp: the output of {summary['job']!r} is NOT certified to agree with the original model on >= "
        f"{cert['promise']:.2%} of rows (interval {cert['interval'][0]:.2%}..{cert['interval'][1]:.2%}). "
        f"Disagreements were seen in parts {parts[:20]}. The output is complete; audit it with `offramp verify "
        f"{summary['output']}`, or bring it within the promise with `offramp run CONFIG --repair` (re-runs the "
        "early-exit rows of those parts through the original model).",
        err=True, fg="red", bold=True)
    if on_uncertified == "fail":
        sys.exit(3)


@main.command()
@click.argument("output_url")
@click.option("--sample", default=None, type=int, help="Check N answered rows drawn uniformly (default: every row).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--text-column", default=None, help="Input text column (default: the job's).")
@click.option("--model", default=None, help="Early-exit artifact whose original model to run (default: the job's).")
@click.option("--json", "json_out", default=None, help="Also write the report as JSON to this path.")
def verify(output_url, sample, seed, text_column, model, json_out):
    """Audit a finished job: run the original model plainly over its rows and print the true agreement
    beside what the job's summary claimed, per part and per exit layer."""
    from pipeline.commands.progress import progress
    from pipeline.offline.verify import format_report, write_report
    from pipeline.offline.verify import verify as run

    try:
        report = run(output_url, sample=sample, seed=seed, text_column=text_column, model=model,
                     echo=lambda m: click.echo(m, err=True), progress=progress("original model"))
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    click.echo(format_report(report))
    if json_out:
        write_report(report, json_out)


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", required=True, help="Ray dashboard address, e.g. http://head:8265.")
@click.option("--input", "input_url", default=None)
@click.option("--output", "output_url", default=None)
@click.option("--model", default=None)
@click.option("--resume", is_flag=True)
@click.option("--wait", is_flag=True, help="Wait for the job to finish and print its logs.")
def submit(config, address, input_url, output_url, model, resume, wait):
    """Submit CONFIG as a Ray Job (the project is the job's working dir; entrypoint jobs/run_job.py)."""
    from pipeline.offline.submit import job_logs, submit_job, wait_for_job

    try:
        job_id = submit_job(config, address, input_url, output_url, resume, model)
    except (ValueError, FileNotFoundError, ConnectionError, RuntimeError) as e:
        _fail(e)
    click.echo(job_id)
    if wait:
        status = wait_for_job(job_id, address)
        click.echo(job_logs(job_id, address), err=True)
        click.echo(status)
        if status != "SUCCEEDED":
            sys.exit(1)


@main.command()
@click.argument("job_id")
@click.option("--address", required=True, help="Ray dashboard address, e.g. http://head:8265.")
@click.option("--logs", is_flag=True, help="Print the job's logs too.")
def status(job_id, address, logs):
    """Status (and logs) of a submitted job."""
    from pipeline.offline.submit import job_logs, job_status

    click.echo(job_status(job_id, address))
    if logs:
        click.echo(job_logs(job_id, address))


@main.command()
@click.option("--address", default="auto", show_default=True,
              help="Ray cluster (GCS address, e.g. head:6379; `auto`: the one running on this machine).")
@click.option("--namespace", default="offramp", show_default=True)
@click.option("--stop", "stop_name", default=None, metavar="NAME", help="Remove this controller (its checkpoint stays).")
def controllers(address, namespace, stop_name):
    """The threshold controllers alive on a cluster (name, thresholds version, windows, constraint, checkpoint)."""
    import ray

    from pipeline.control.actor import list_controllers, stop_controller

    started = not ray.is_initialized()
    try:
        if started:
            ray.init(address=address, namespace=namespace, log_to_driver=False, logging_level="ERROR")
    except ConnectionError as e:
        _fail(ConnectionError(f"no Ray cluster at {address!r} ({e}); give --address HEAD:6379"))
    try:
        if stop_name:
            if not stop_controller(stop_name, namespace):
                _fail(ValueError(f"no controller {stop_name!r} in namespace {namespace!r}"))
            click.echo(f"stopped {stop_name}")
            return
        rows = list_controllers(namespace)
        if not rows:
            click.echo(f"no controllers in namespace {namespace!r}")
        for r in rows:
            click.echo(f"{r['name']}  error {r['error']}" if "error" in r else
                       f"{r['name']}  version {r['version']}  windows {r['windows']}  constraint {r['constraint']}"
                       f"  checkpoint {r['checkpoint_url'] or '-'}")
    finally:
        if started:
            ray.shutdown()


@main.group()
def bench():
    """Benchmarks: print a table and write JSON, baselines measured side by side in the same run."""


@bench.command("model")
@click.option("--model", "model_dir", required=True, help="Early-exit artifact directory.")
@click.option("--dataset", default="movie-reviews", show_default=True)
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "validation", "test"]))
@click.option("--limit", default=None, type=int)
@click.option("--thresholds", default="0.6,0.7,0.8,0.9,0.95", show_default=True, help="Shared thresholds to sweep.")
@click.option("--dtypes", default="float32,bfloat16", show_default=True)
@click.option("--reps", default=2, show_default=True, type=int, help="Timed passes per row; the best is reported.")
@click.option("--out", "out_json", default="bench_results/model.json", show_default=True)
def bench_model(model_dir, dataset, split, limit, thresholds, dtypes, reps, out_json):
    """Threshold sweep vs the plain original model and length-sorted batches, plus the oracle."""
    from pipeline.bench.model_bench import run_model_bench

    run_model_bench(model_dir, dataset, split, limit, [float(x) for x in thresholds.split(",")],
                    tuple(dtypes.split(",")), out_json=out_json, reps=reps, echo=click.echo)


@bench.command("offline")
@click.option("--model", "model_dir", default="artifacts/minilm-movie-ee", show_default=True)
@click.option("--config", default="configs/jobs/movie_reviews.yaml", show_default=True, help="Job YAML whose engine/actors settings (b) uses.")
@click.option("--rows", default=50_000, show_default=True, type=int)
@click.option("--dtype", default=None, help="Override engine.dtype for (b).")
@click.option("--quantize", default=None, help="Override engine.compression for (b).")
@click.option("--skip-baseline", is_flag=True, help="Skip (a) (slow: ~100 rows/s on 2 cores).")
@click.option("--out", "out_json", default="bench_results/offline.json", show_default=True)
def bench_offline(model_dir, config, rows, dtype, quantize, skip_baseline, out_json):
    """(a) Ray docs-style map_batches vs (b) offramp's job vs (c) ONNX Runtime int8, same corpus."""
    from pipeline.bench.offline_bench import run_offline_bench

    overrides = {k: v for k, v in {"dtype": dtype, "compression": quantize}.items() if v is not None}
    run_offline_bench(model_dir, config, rows, out_json, skip_baseline, overrides, echo=click.echo)


@bench.command("accuracy")
@click.option("--model", "model_dirs", multiple=True, show_default=True,
              default=["artifacts/minilm-movie-ee"],
              help="An early-exit artifact; repeat for several (e.g. its int8 and bf16 versions from `offramp quantize`).")
@click.option("--config", default="configs/jobs/movie_reviews.yaml", show_default=True, help="Job YAML to run.")
@click.option("--corpora", default=None, help="Comma-separated built-in datasets; A+B+C = those in order. "
              "Default: movie-reviews and the three other domains, alone and mixed.")
@click.option("--skip-uncertified", is_flag=True, help="Run only the certified job (b), not the baseline (a).")
@click.option("--out", "out_json", default="bench_results/accuracy.json", show_default=True)
def bench_accuracy(model_dirs, config, corpora, skip_uncertified, out_json):
    """(a) the job without certification vs (b) the certified job, per artifact and corpus, each output audited by
    `verify` against the float original."""
    from pipeline.bench.accuracy_bench import CORPORA, run_accuracy_bench

    run_accuracy_bench(list(model_dirs), config, corpora or CORPORA, out_json, echo=click.echo,
                       uncertified=not skip_uncertified)


@bench.command("frontier")
@click.option("--model", "model_dir", default="artifacts/minilm-movie-ee", show_default=True,
              help="The float early-exit artifact (and the peers' model: its model/).")
@click.option("--also", "others", multiple=True, help="Another artifact to run the certified job on (repeat), e.g. "
              "artifacts/minilm-movie-ee-int8 from `offramp quantize`.")
@click.option("--config", default="configs/jobs/movie_reviews.yaml", show_default=True, help="Job YAML to run.")
@click.option("--rows", default=50_000, show_default=True, type=int, help="The movie-review corpus repeated to this.")
@click.option("--promises", default="0.995,0.99,0.98,0.965", show_default=True, help="The certified job's promises.")
@click.option("--skip-ray-docs", is_flag=True, help="Leave out the Ray Data docs-way peer (the slowest to run).")
@click.option("--out", "out_json", default="bench_results/frontier.json", show_default=True)
@click.option("--plot", default="bench_results/frontier.png", show_default=True)
def bench_frontier(model_dir, others, config, rows, promises, skip_ray_docs, out_json, plot):
    """Rows/s against agreement with the float original for every peer and offramp's certified job at several
    promises, one corpus, one run."""
    from pipeline.bench.frontier_bench import run_frontier_bench

    run_frontier_bench(model_dir, list(others), config, rows, tuple(float(x) for x in promises.split(",")),
                       skip_ray_docs, out_json, plot, echo=click.echo)


@bench.command("calibration")
@click.option("--model", "model_dir", default="artifacts/minilm-movie-ee", show_default=True)
@click.option("--corpora", default="movie-reviews", show_default=True,
              help="Comma-separated built-in datasets (A+B+C = those in order).")
@click.option("--seeds", default=30, show_default=True, type=click.IntRange(1), help="Draws per design.")
@click.option("--out", "out_json", default="bench_results/calibration.json", show_default=True)
def bench_calibration(model_dir, corpora, seeds, out_json):
    """Calibration designs replayed on one recording of each corpus: what certifying costs in layer work, against
    the uncertified start and an oracle, in the same run."""
    from pipeline.bench.calibration_bench import run_calibration_bench

    run_calibration_bench(model_dir, corpora, seeds, out_json, echo=click.echo)


@bench.command("report")
@click.option("--results", default="bench_results", show_default=True, help="Folder of benchmark result JSON.")
@click.option("--out", default=None, help="Write the table into this markdown file (between its report markers), "
                                         "e.g. docs/benchmarks.md; default: print it.")
def bench_report(results, out):
    """One line per benchmark result: offramp's figure, the baseline from the same run, the ratio, the machine."""
    from pipeline.bench.report import render, write_into

    try:
        table = render(results)
    except FileNotFoundError as e:
        _fail(e)
    if out:
        write_into(out, table)
        click.echo(f"wrote the table into {out}")
    else:
        click.echo(table, nl=False)


@main.command()
@click.option("--workdir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Where the demo model and artifact are cached between runs.")
def demo(workdir):
    """The embedded default: fine-tune MiniLM on movie reviews (cached), bootstrap ramps (cached),
    then classify the movie-review corpus."""
    from pipeline.demo import run_demo

    try:
        summary = run_demo(Path(workdir), echo=click.echo, progress=progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(e)
    _check_certificate(summary, "fail")


def _register_commands() -> None:
    """Commands that live next to their subsystem (each module imports only click at top level)."""
    from pipeline.bench.online_bench import bench_online
    from pipeline.commands.compression import bench_compression, distill, quantize
    from pipeline.commands.families import bench_families
    from pipeline.commands.prune import bench_pruning, prune
    from pipeline.commands.replay import replay
    from pipeline.commands.serve import serve

    for command in (serve, distill, quantize, prune, replay):
        main.add_command(command)
    bench.add_command(bench_online, "online")
    bench.add_command(bench_compression, "compression")
    bench.add_command(bench_pruning, "pruning")
    bench.add_command(bench_families, "families")


_register_commands()

if __name__ == "__main__":
    main()
