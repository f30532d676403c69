"""`offramp bench report`: one line per benchmark result JSON (offramp's figure, its baseline from the same run,
the ratio, the machine, the command), written into docs/benchmarks.md between markers or printed."""
from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- offramp bench report: begin -->", "<!-- offramp bench report: end -->"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def headlines(result: dict) -> list[dict]:
    """What a result says, as rows of {benchmark, offramp, baseline, ratio, accuracy} (empty if unknown kind)."""
    if "pruned" in result and "rows_table" in result:  # bench pruning
        full = [r for r in result["rows_table"] if r["mode"] == "full" and r["artifact"] != result["source"]]
        return [{"benchmark": f"pruning: {r['artifact'].rstrip('/').split('/')[-1]} ({r['ffn']:.0%} of feed-forward "
                              f"neurons, {r['heads']:.0%} of heads), {result['rows']} rows of {result['dataset']}",
                 "offramp": f"{r['rows_per_s']:.1f} rows/s at full depth ({r['dtype']})",
                 "baseline": "the unpruned artifact at full depth, same dtype", "ratio": f"{r['vs_unpruned']:.2f}x",
                 "accuracy": f"agreement with the original {_pct(r['agreement'])}"} for r in full]
    if "rows_table" in result and "plain_rows_per_s" in result:  # bench model
        rows = {r["method"]: r for r in result["rows_table"]}
        plain = next(r for r in result["rows_table"] if r.get("note") == "baseline")
        tuned = next((r for m, r in rows.items() if m.startswith("offramp exit, tuned thresholds (float32")), None)
        if tuned is None:
            return []
        return [{"benchmark": f"model: {result['rows']} rows of {result['dataset']}, {result['device']}",
                 "offramp": f"{tuned['rows_per_s']:.1f} rows/s (tuned exits, float32)",
                 "baseline": f"{plain['rows_per_s']:.1f} rows/s (plain transformers)",
                 "ratio": f"{tuned['vs_plain']:.2f}x", "accuracy": f"agreement {_pct(tuned['agreement'])}"}]
    if result.get("results") and "vs_a" in result["results"][0]:  # bench offline
        a, b = result["results"][0], result["results"][1]
        out = [{"benchmark": f"offline job: {result['rows']} rows, {result.get('cpus')} CPUs",
                "offramp": f"{b['rows_per_s']:.1f} rows/s", "baseline": f"{a['rows_per_s']:.1f} rows/s (Ray Data docs)",
                "ratio": f"{b['vs_a']:.2f}x", "accuracy": f"agreement {_pct(b['agreement_with_original'])}"}]
        for peer in result["results"][2:]:
            out.append({"benchmark": f"offline peer: {peer['method']}", "offramp": "-",
                        "baseline": f"{peer['rows_per_s']:.1f} rows/s", "ratio": f"{peer['vs_a']:.2f}x (vs Ray Data docs)",
                        "accuracy": f"agreement {_pct(peer['agreement_with_original'])}"})
        return out
    if result.get("results") and "corpus" in result["results"][0]:  # bench accuracy
        out = []
        groups: dict[tuple, dict[str, dict]] = {}
        for r in result["results"]:
            groups.setdefault((r.get("compression", "none"), r["corpus"]), {})[r["method"][:3]] = r
        for (compression, corpus), by in groups.items():
            after, before = by.get("(b)"), by.get("(a)")
            if after is None:
                continue
            lo, hi = (after.get("claimed_interval") or [None, None])[:2]
            interval = f" [{_pct(lo)}, {_pct(hi)}]" if lo is not None else ""
            ratio = (after["layer_compute_saved"] / before["layer_compute_saved"]
                     if before and before.get("layer_compute_saved") else None)
            model = "" if compression == "none" else f"{compression} artifact, "
            out.append({"benchmark": f"accuracy: {model}{corpus}, {after['rows']} rows",
                        "offramp": f"true agreement {_pct(after['true_agreement'])}, claimed{interval}, "
                                   f"{'certified' if after.get('certified') else 'NOT certified'}",
                        "baseline": ("-" if before is None else
                                     f"true agreement {_pct(before['true_agreement'])} (no certification)"),
                        "ratio": "-" if ratio is None else f"layer work saved {ratio:.2f}x of the baseline's",
                        "accuracy": f"{after['disagreements']} disagreement" + ("" if after['disagreements'] == 1 else "s")})
        return out
    if result.get("results") and "family" in result["results"][0]:  # bench families
        rows = result["results"]
        saved = sorted(r["layer_compute_saved"] or 0.0 for r in rows)
        worst = min(rows, key=lambda r: r["true_agreement"])
        holds = sum(bool(r.get("interval_contains_truth")) for r in rows)
        size = f"{result['layers']} x {result['hidden']}"
        return [{"benchmark": f"families: {len(rows)} models ({size}, trained here from random weights), certified "
                              f"job on {rows[0]['rows']} movie reviews",
                 "offramp": f"layer work saved {_pct(saved[0])} to {_pct(saved[-1])} (median "
                            f"{_pct(saved[len(saved) // 2])})",
                 "baseline": "the float original on every row (verify)", "ratio": "-",
                 "accuracy": f"{sum(bool(r.get('certified')) for r in rows)}/{len(rows)} certified, interval holds the "
                             f"truth {holds}/{len(rows)}, lowest true agreement {_pct(worst['true_agreement'])} "
                             f"({worst['family']})" + (f"; FAILED: {', '.join(result['failures'])}"
                                                       if result.get("failures") else "")}]
    if isinstance(result.get("corpora"), dict) and "seeds" in result:  # bench calibration
        out = []
        for corpus, c in result["corpora"].items():
            by = {r["design"].strip(): r for r in c["results"]}
            job, base = by.get("certified at the bulk's budget (the job)"), c["results"][0]
            oracle = by.get("oracle: thresholds fitted to every row (not runnable)")
            if job is None:
                continue
            out.append({"benchmark": f"calibration (replayed): {corpus}, {c['rows']} rows, {job['runs']} draws",
                        "offramp": f"layer work saved {_pct(job['saved_mean'])} (p10 {_pct(job['saved_p10'])}); "
                                   f"oracle {_pct(oracle['saved_mean']) if oracle else '-'}",
                        "baseline": f"{_pct(base['saved_mean'])} at agreement {_pct(base['agreement_mean'])} "
                                    "(artifact thresholds, uncertified)",
                        "ratio": f"{job['saved_vs_uncertified']:.2f}x of the baseline's" if job.get(
                            "saved_vs_uncertified") else "-",
                        "accuracy": f"agreement {_pct(job['agreement_mean'])} (min {_pct(job['agreement_min'])}), "
                                    f"{job['runs_under_promise']}/{job['runs']} under the promise"})
        return out
    if "points" in result:  # bench frontier
        out = []
        peers = [p for p in result["points"] if p["system"] != "offramp"]
        for job in (p for p in result["points"] if p["system"] == "offramp"):
            level = job["promise"]
            rivals = [p for p in peers if p["agreement"] >= level]
            best = max(rivals, key=lambda p: p["rows_per_s"]) if rivals else None
            out.append({"benchmark": f"frontier: {result['rows']} rows, {job['config']}",
                        "offramp": f"{job['rows_per_s']:.1f} rows/s, job / engine {job.get('job_vs_engine', 0):.2f}",
                        "baseline": ("no peer reaches it" if best is None else
                                     f"{best['rows_per_s']:.1f} rows/s ({best['system']} {best['config'].split(',')[0]})"),
                        "ratio": "-" if best is None else f"{job['rows_per_s'] / best['rows_per_s']:.2f}x",
                        "accuracy": f"agreement {_pct(job['agreement'])}, promise {_pct(level)}"
                                    + ("" if job.get("certified") else " NOT certified")})
        return out
    if "runs" in result and "plain" in result:  # bench online
        from pipeline.bench.online_bench import FLOOR

        out = []
        plain = {r["fraction_of_plain_capacity"]: r for r in result["runs"] if r["app"] == "plain"}
        art = f" ({Path(result['model']).name})" if result.get("model") else ""
        others: dict[float, str] = {}  # other plain peers' p50 at each load (e.g. plain-bf16), beside (a)'s
        for r in result["runs"]:
            if r["app"].startswith("plain-") and r["p50_ms"]:
                frac = r["fraction_of_plain_capacity"]
                others[frac] = others.get(frac, "") + f"; {r['app']} p50 {r['p50_ms']:.0f} ms"
        for r in result["runs"]:
            if r["app"].startswith("plain") or r["fraction_of_plain_capacity"] not in plain:
                continue
            p = plain[r["fraction_of_plain_capacity"]]
            out.append({"benchmark": f"online: {r['app']}{art} at {r['fraction_of_plain_capacity']:.0%} of plain capacity "
                                     f"({r['offered_rps']:.1f} req/s)",
                        "offramp": f"p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms",
                        "baseline": f"p50 {p['p50_ms']:.0f} ms, p99 {p['p99_ms']:.0f} ms (plain @serve.batch)"
                                    + others.get(r["fraction_of_plain_capacity"], ""),
                        "ratio": f"p50 {p['p50_ms'] / r['p50_ms']:.2f}x lower" if r["p50_ms"] else "-",
                        "accuracy": f"{r['errors']} errors"})
        cap = result.get("capacity_rps", {})
        peers = [n for n in cap if n.startswith("plain")]
        for name in [n for n in cap if not n.startswith("plain") and n != FLOOR] if "plain" in cap else []:
            out.append({"benchmark": f"online capacity: {name}{art} (closed loop, 64 in flight)",
                        "offramp": f"{cap[name]:.1f} req/s",
                        "baseline": ", ".join(f"{n} {cap[n]:.1f} req/s" for n in peers)
                                    + (f" (Serve alone, no model: {cap[FLOOR]:.1f})" if FLOOR in cap else ""),
                        "ratio": ", ".join(f"{cap[name] / cap[n]:.2f}x {n}" for n in peers),
                        "accuracy": "-"})
        return out
    return []


def render(results_dir: str) -> str:
    """A markdown table of every result JSON in `results_dir`, by file name."""
    files = sorted(Path(results_dir).glob("*.json"))
    lines = ["| benchmark | offramp | baseline, same run | ratio | accuracy | machine | result |",
             "|---|---|---|---|---|---|---|"]
    for f in files:
        try:
            result = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for h in headlines(result):
            lines.append(f"| {h['benchmark']} | {h['offramp']} | {h['baseline']} | {h['ratio']} | {h['accuracy']} | "
                         f"{result.get('machine') or result.get('cpu') or '-'} | `{f.name}` |")
    if len(lines) == 2:
        raise FileNotFoundError(f"no benchmark results in {results_dir!r}; run an `offramp bench ...` command first")
    return "\n".join(lines) + "\n"


def write_into(doc: str, table: str) -> None:
    """Replace the text between the report markers in `doc` (appended at the end when it has none)."""
    path = Path(doc)
    text = path.read_text() if path.exists() else ""
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Latest results\n\n" + block + "\n"
    path.write_text(text)
