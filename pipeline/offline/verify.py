"""`offramp verify`: audit a finished job against the original model run plainly.

Reads the job's plan (input shards), its parts and its summary, runs the original classifier (plain
transformers, float32, no ramps, no compression) over every answered row or a uniform sample of them, and
reports the true agreement of the output beside what the summary claimed: per job, per part, per exit layer.
"""
from __future__ import annotations

import json
import math

import numpy as np

from pipeline.control.stats import clopper_pearson
from pipeline.data.readers import require_columns
from pipeline.offline import sink
from pipeline.offline.shards import Shard, read_shard


def read_output(output_url: str):
    """(summary, plan, rows) of a finished job; rows: dict of numpy arrays, one entry per output row."""
    import pyarrow.parquet as pq

    summary = sink.read_json(output_url, sink.SUMMARY)
    plan = sink.read_json(output_url, sink.PLAN)
    if plan is None:
        raise FileNotFoundError(f"{output_url!r} holds no {sink.PLAN}: not the output of an offramp job")
    if summary is None:
        raise FileNotFoundError(f"{output_url!r} holds no {sink.SUMMARY}: the job has not finished (--resume it)")
    fs, _ = sink.filesystem(output_url)
    cols: dict[str, list] = {k: [] for k in ("shard", "row", "id", "label_id", "exit_layer", "error")}
    for shard, paths in sorted(sink.list_parts(output_url).items()):
        for p in sorted(paths):
            first = int(sink.PART.search(p).group(2))
            with fs.open(p, "rb") as f:
                t = pq.read_table(f)
            t = t.select([c for c in ("id", "label_id", "exit_layer", "error", "row") if c in t.column_names])
            t = t.to_pydict()
            n = len(t["id"])
            cols["shard"] += [shard] * n
            cols["row"] += t["row"] if "row" in t else list(range(first, first + n))  # `row`: a filtered part
            for k in ("id", "label_id", "exit_layer", "error"):
                cols[k] += t[k]
    rows = {k: np.asarray(v, dtype=object if k in ("id", "error") else np.int64) for k, v in cols.items()}
    return summary, plan, rows


def original_predictions(model_dir: str, texts: list[str], batch_rows: int = 64, progress=None) -> np.ndarray:
    """[N] the original classifier's answer ids (EE_DIR/model, its head's kind as the manifest records it: a label,
    a regression's bin, a multi-label set), plain transformers in float32, length-sorted batches (padding does not
    change a row's answer beyond float rounding)."""
    from pipeline.model.artifact import load_classifier, load_tokenizer, model_max_length, original_of, read_manifest
    from pipeline.model.classify import classifier_logits
    from pipeline.model.heads import head_kind

    model_dir = original_of(model_dir)  # a pruned artifact's float original is its source
    model = load_classifier(f"{model_dir}/model").float()
    tok = load_tokenizer(f"{model_dir}/model")
    head = head_kind(model.config, read_manifest(model_dir).head)
    max_length = model_max_length(model.config, tok)
    return head.decide(classifier_logits(model, tok, texts, max_length, batch_rows, progress)).answer.numpy()


def _texts(plan: dict, text_column: str, shard: np.ndarray, row: np.ndarray) -> list:
    """The input text of each (shard, row within the shard) pair."""
    by_shard = {s["shard"]: Shard(s["shard"], s["path"], s["start"], s["stop"]) for s in plan["shards"]}
    texts: list = [None] * len(shard)
    for s in np.unique(shard):
        table = read_shard(by_shard[int(s)], text_column)
        require_columns(table, [text_column], "input", "pass --text-column")
        col = table.column(text_column)
        for i in np.flatnonzero(shard == s):
            texts[i] = col[int(row[i])].as_py()
    return texts


def _interval(agree: int, n: int, confidence: float) -> dict:
    lo, hi = clopper_pearson(n - agree, n, confidence) if n else (0.0, 1.0)
    return {"rows": n, "agreement": agree / n if n else None, "interval": [1 - hi, 1 - lo]}


def verify(output_url: str, sample: int | None = None, seed: int = 0, text_column: str | None = None,
           model: str | None = None, confidence: float = 0.95, echo=print, progress=None) -> dict:
    """Run the original model over the job's answered rows (all, or `sample` of them drawn uniformly) and
    compare. Returns the report (also what `offramp verify --json` writes)."""
    summary, plan, rows = read_output(output_url)
    model = model or summary["model"]
    text_column = text_column or plan.get("text_column", "text")
    answered = np.flatnonzero(np.array([e is None for e in rows["error"]], bool))
    pick = answered
    if sample is not None and sample < len(answered):
        pick = np.sort(np.random.default_rng(seed).choice(answered, size=sample, replace=False))
    echo(f"verify: {len(pick)} of {len(answered)} answered rows ({len(rows['id'])} in the output) "
         f"through the original model of {model}")
    texts = _texts(plan, text_column, rows["shard"][pick], rows["row"][pick])
    truth = original_predictions(model, texts, progress=progress)
    ok = rows["label_id"][pick] == truth
    exact = len(pick) == len(answered)
    report = {
        "output": output_url,
        "model": model,
        "rows_output": int(len(rows["id"])),
        "rows_answered": int(len(answered)),
        "rows_checked": int(len(pick)),
        "sample": None if exact else {"rows": int(len(pick)), "seed": seed,
                                      "interval": f"Clopper-Pearson {100 * confidence:g}%"},
        "agreement": float(ok.mean()) if len(ok) else None,
        "disagreements": int((~ok).sum()),
    }
    if not exact:
        report.update(_interval(int(ok.sum()), len(ok), confidence))
        report["rows"] = int(len(pick))
    if exact and len(ok):
        # The output in input order, cut in 512-row stretches: how uneven agreement is along the corpus.
        order = np.lexsort((rows["row"][pick], rows["shard"][pick]))
        stretches = [float(ok[order[i:i + 512]].mean()) for i in range(0, len(order), 512)]
        report["stretches_512"] = {"count": len(stretches), "below_promise": None, "worst": min(stretches)}
        promise = (summary.get("certificate") or {}).get("promise", 0.99)
        report["stretches_512"]["below_promise"] = sum(x < promise for x in stretches)
    layers = rows["exit_layer"][pick]
    report["per_exit_layer"] = {str(int(layer)): {"rows": int((layers == layer).sum()),
                                                  "agreement": float(ok[layers == layer].mean())}
                                for layer in np.unique(layers)}
    shards = rows["shard"][pick]
    claimed = {int(p["shard"]): p for p in (summary.get("certificate") or {}).get("parts", [])}
    report["per_part"] = {}
    for s in np.unique(shards):
        m = shards == s
        entry = {"rows": int(m.sum()), "agreement": float(ok[m].mean())}
        if int(s) in claimed:
            entry["claimed"] = claimed[int(s)].get("agreement")
            entry["claimed_interval"] = claimed[int(s)].get("interval")
        report["per_part"][str(int(s))] = entry
    report["claimed"] = _claim(summary)
    if summary.get("filtered_out"):  # the certificate covers every answer; the output holds the rows kept
        report["filtered_out"] = int(summary["filtered_out"])
    iv = (report["claimed"] or {}).get("interval")
    if iv and exact:
        report["claim_interval_contains_truth"] = bool(iv[0] - 1e-9 <= report["agreement"] <= iv[1] + 1e-9)
    return report


def _claim(summary: dict) -> dict | None:
    """What the job's summary claimed about its agreement (a certificate, or the older shadow point estimate)."""
    cert = summary.get("certificate")
    if cert:
        return {"agreement": cert.get("agreement"), "interval": cert.get("interval"), "method": cert.get("method"),
                "certified": cert.get("certified")}
    if summary.get("shadow_agreement") is not None:
        return {"agreement": summary["shadow_agreement"], "interval": None,
                "method": f"shadow rows ({summary.get('shadow_rows')}), point estimate"}
    return None


def format_report(report: dict, parts: int = 12) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    lines = []
    c = report["claimed"] or {}
    iv = c.get("interval")
    true = pct(report["agreement"])
    if report.get("interval"):
        lo, hi = report["interval"]
        true += f" [{pct(lo)}, {pct(hi)}] ({report['sample']['interval']}, {report['rows_checked']} rows)"
    else:
        true += f" (every answered row: {report['rows_checked']}, {report['disagreements']} disagreements)"
    lines.append(f"true agreement with the original model: {true}")
    claim = pct(c.get("agreement")) + (f" [{pct(iv[0])}, {pct(iv[1])}]" if iv else "")
    lines.append(f"the summary claimed:                   {claim} ({c.get('method', 'nothing')})")
    if "claim_interval_contains_truth" in report:
        lines.append(f"the claimed interval contains the truth: {'yes' if report['claim_interval_contains_truth'] else 'NO'}")
    if "stretches_512" in report:
        st = report["stretches_512"]
        lines.append(f"512-row stretches of the output below the promise: {st['below_promise']} of {st['count']} "
                     f"(worst {pct(st['worst'])})")
    lines.append("per exit layer:  " + "  ".join(f"{k}: {v['rows']} rows {pct(v['agreement'])}"
                                                  for k, v in report["per_exit_layer"].items()))
    worst = sorted(report["per_part"].items(), key=lambda kv: kv[1]["agreement"])[:parts]
    lines.append(f"parts, worst {len(worst)} of {len(report['per_part'])}:")
    for s, v in worst:
        claimed = ""
        if v.get("claimed_interval"):
            lo, hi = v["claimed_interval"]
            claimed = f"   claimed {pct(v.get('claimed'))} [{pct(lo)}, {pct(hi)}]"
        lines.append(f"  part {s:>6}: {v['rows']:>6} rows  {pct(v['agreement'])}{claimed}")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))
