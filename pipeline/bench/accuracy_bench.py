"""Accuracy benchmark (`offramp bench accuracy`): does a job keep its promise on corpora nobody tuned on?

For each artifact (the float one, and its compressed versions from `offramp quantize`) and each corpus (built-in
datasets and in-order mixes of them, as a user's corpus arrives), side by side in one run on this machine:
 (a) the job as it was before certification (`certify.enabled: false`: the artifact's thresholds, a 5%
     shadow fraction feeding the controller, a point estimate in the summary) — the baseline;
 (b) the job as it runs by default (calibrated on the corpus, audited, certified against the float original).
Each output is then checked by `offramp verify` over every row: the true agreement with the float original
beside what the summary claimed, and the layer work saved.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.bench import machine, timed_job, write_result

CORPORA = "movie-reviews,amazon-reviews,tweets,nyt-editorials,amazon-reviews+tweets+nyt-editorials"


def _run(cfg, certify: bool, out: Path) -> tuple[dict, float]:
    return timed_job(cfg, out, f"accuracy-{out.name}", certify={"enabled": certify, "on_uncertified": "warn"})


def run_accuracy_bench(models: list[str] | str, config: str = "configs/jobs/movie_reviews.yaml", corpora: str = CORPORA,
                       out_json: str = "bench_results/accuracy.json", echo=print, uncertified: bool = True) -> dict:
    from pipeline.config import JobConfig
    from pipeline.model.artifact import read_manifest
    from pipeline.offline.job import materialize_builtin
    from pipeline.offline.verify import verify

    models = [models] if isinstance(models, str) else list(models)
    work = Path(tempfile.mkdtemp(prefix="offramp-accuracy-"))
    results = []
    for model in models:
        base = JobConfig.from_yaml(config, model=model)
        compression = (read_manifest(model).compression or {}).get("method", "none")
        for name in corpora.split(","):
            url = materialize_builtin(f"builtin:{name}")
            cfg = base.model_copy(update={"input": base.input.model_copy(update={"url": url, "passthrough": []})})
            for certify, label in (((False, "(a) before: artifact thresholds, shadow point estimate"),) if uncertified
                                   else ()) + ((True, "(b) certified: calibrated, audited"),):
                out = work / f"{Path(model).name}-{name}-{'certified' if certify else 'baseline'}"
                summary, seconds = _run(cfg, certify, out)
                report = verify(str(out), echo=lambda m: None)
                claim = report["claimed"] or {}
                cert = summary.get("certificate") or {}
                row = {
                    "model": model, "compression": compression,
                    "corpus": name, "method": label, "rows": summary["rows"],
                    "promise": cert.get("promise"),
                    "true_agreement": report["agreement"], "disagreements": report["disagreements"],
                    "claimed": claim.get("agreement"), "claimed_interval": claim.get("interval"),
                    "interval_contains_truth": report.get("claim_interval_contains_truth"),
                    "certified": cert.get("certified"),
                    "stretches_512_below_promise": report.get("stretches_512", {}).get("below_promise"),
                    "stretches_512": report.get("stretches_512", {}).get("count"),
                    "layer_compute_saved": summary["layer_compute_saved"],
                    "layer_compute_saved_actual": summary.get("layer_compute_saved_actual"),
                    "mean_exit_layer": summary["mean_exit_layer"],
                    "seconds": round(seconds, 1),
                    "rows_per_s": summary.get("rows_per_s"),
                    "answer_with": cert.get("answer_with"),
                    "cost": cert.get("cost"),
                    "per_exit_layer": report["per_exit_layer"],
                }
                results.append(row)
                echo(_line(row))
    result = {"models": models, "config": config, "machine": machine(), "results": results}
    echo(format_table(results))
    write_result(result, out_json, echo)
    return result


def _pct(x):
    return "-" if x is None else f"{100 * x:.2f}%"


def _line(r: dict) -> str:
    iv = r["claimed_interval"]
    claim = _pct(r["claimed"]) + (f" [{_pct(iv[0])}, {_pct(iv[1])}]" if iv else " (point)")
    return (f"{r['compression']:<12} {r['corpus']:<38} {r['method'][:3]} true {_pct(r['true_agreement'])} claimed "
            f"{claim} saved {_pct(r['layer_compute_saved'])} ({_pct(r['layer_compute_saved_actual'])} actual) "
            f"{r['seconds']} s")


def format_table(results: list[dict]) -> str:
    head = ("| model | corpus | job | rows | true agreement (float original) | summary claimed | interval holds truth | "
            "certified | 512-row stretches < promise | layer work saved (answers / actual) | job s |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        iv = r["claimed_interval"]
        claim = _pct(r["claimed"]) + (f" [{_pct(iv[0])}, {_pct(iv[1])}]" if iv else " (point, no interval)")
        holds = {True: "yes", False: "NO", None: "-"}[r["interval_contains_truth"]]
        cert = {True: "yes", False: "no", None: "-"}[r["certified"]]
        if r.get("answer_with") == "original" and r["compression"] != "none":
            cert += " (the float original answered the bulk)"
        lines.append(f"| {r['compression']} | {r['corpus']} | {r['method'][:3]} | {r['rows']} | {_pct(r['true_agreement'])} "
                     f"| {claim} | {holds} | {cert} | {r['stretches_512_below_promise']}/{r['stretches_512']} | "
                     f"{_pct(r['layer_compute_saved'])} / {_pct(r['layer_compute_saved_actual'])} | {r['seconds']} |")
    return "\n".join(lines)
