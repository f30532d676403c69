"""Bringing a finished job's output within its promise: more evidence, or the original model's answers.

Both steps re-run rows of the output that the float original did not answer (a ramp's answers, and a compressed
model's own head's) through the whole float original (the calibration code) and rewrite their parts with its
answer, so every re-run row agrees afterwards.

- top-up: a fresh uniform sample of the early-exit rows. Their old answers against the new ones measure the
  early rows' disagreement afresh; the certificate of the rows still answered early then rests on this
  sample alone (the first audit decided that more evidence was needed, so pooling the two would bias it).
  Look k at the output (the job's own audit is look 1) is made at two-sided level 1 - (1 - confidence) / 2^(k-1),
  so the lower tails of all looks together stay within 1 - confidence.
- repair: every early-exit row of the parts where disagreements were seen (or of parts the user names),
  then a top-up for the rest.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from pipeline.offline import sink
from pipeline.offline.shards import Shard


def _parts(output_url: str) -> list[tuple[int, int, str]]:
    """(shard, first row, path) of every part, in order."""
    out = []
    for shard, paths in sorted(sink.list_parts(output_url).items()):
        for p in paths:
            out.append((shard, int(sink.PART.search(p).group(2)), p))
    return sorted(out)


def _positions(part: pa.Table, first: int) -> list[int]:
    """Each row's position in its shard: the `row` column of a filtered part, else counted from its first row."""
    if "row" in part.column_names:
        return part.column("row").to_pylist()
    return list(range(first, first + part.num_rows))


def early_rows(output_url: str, num_layers: int) -> dict[int, np.ndarray]:
    """shard -> positions of its rows not answered by the float original (a ramp's or a compressed head's
    answers), as each part's stats list them (parts written without: rows answered at a ramp)."""
    import pyarrow.parquet as pq

    fs, _ = sink.filesystem(output_url)
    out: dict[int, list] = {}
    for shard, first, path in _parts(output_url):
        with fs.open(path, "rb") as f:
            part = pq.read_table(f)
        stats = json.loads((part.schema.metadata or {}).get(sink.STATS_KEY, b"{}") or "{}")
        if "early_positions" in stats:
            out.setdefault(shard, []).extend(stats["early_positions"])
            continue
        t = part.select(["exit_layer", "error"]).to_pydict()
        for pos, layer, err in zip(_positions(part, first), t["exit_layer"], t["error"]):
            if err is None and layer < num_layers:
                out.setdefault(shard, []).append(pos)
    return {k: np.asarray(sorted(v), np.int64) for k, v in out.items()}


def rerun(cfg, shards: list[Shard], targets: dict[int, np.ndarray], num_layers: int) -> dict[int, dict]:
    """Re-run `targets` (shard -> positions) through the whole model and rewrite their parts. Returns, per
    shard, {"rows": re-run rows, "disagree": how many of their old answers the original model did not give}."""
    import pyarrow.parquet as pq

    from pipeline.offline.calibrate import run_sample

    targets = {k: v for k, v in targets.items() if len(v)}
    if not targets:
        return {}
    table = run_sample(cfg, shards, targets, cfg.actors.max_actors)
    new = {(s, r): (lab, lid, sc) for s, r, lab, lid, sc in zip(
        *(table.column(c).to_pylist() for c in ("shard", "row", "label", "label_id", "score")))}
    fs, _ = sink.filesystem(cfg.output.url)
    counts: dict[int, dict] = {}
    for shard, first, path in _parts(cfg.output.url):
        if shard not in targets:
            continue
        with fs.open(path, "rb") as f:
            part = pq.read_table(f)
        d = part.to_pydict()
        stats = json.loads((part.schema.metadata or {}).get(sink.STATS_KEY, b"{}") or "{}")
        positions = _positions(part, first)
        hit = [i for i in range(part.num_rows) if (shard, positions[i]) in new]
        if not hit:
            continue
        c = counts.setdefault(shard, {"rows": 0, "disagree": 0})
        ramps = sum(d["exit_layer"][i] < num_layers for i in hit)  # a ramp had answered them
        for i in hit:
            lab, lid, sc = new[(shard, positions[i])]
            c["rows"] += 1
            c["disagree"] += int(d["label_id"][i] != lid)
            d["label"][i], d["label_id"][i], d["score"][i], d["exit_layer"][i] = lab, lid, sc, num_layers
        if stats:
            stats["early"] = stats.get("early", 0) - len(hit)
            stats["ramp"] = max(0, stats.get("ramp", 0) - ramps)
            stats["exact"] = stats.get("exact", 0) + len(hit)
            if "early_positions" in stats:
                done = {positions[i] for i in hit}
                stats["early_positions"] = [p for p in stats["early_positions"] if p not in done]
        sink.write_part(pa.Table.from_pydict(d, schema=part.schema.remove_metadata()), cfg.output.url, shard,
                        first, stats or None)
    return counts


def top_up(cfg, shards: list[Shard], cert: dict, constraint: float, num_layers: int, echo=print) -> dict | None:
    """A fresh audit of the rows still answered early, sized from the early-row disagreement `cert`'s audit saw;
    the new certificate (None when no sample size could clear the promise at that rate: repair instead)."""
    from pipeline.control.stats import rows_to_certify
    from pipeline.offline.certificate import certify

    c = cfg.certify
    looks = int(cert.get("looks", 1)) + 1
    level = 1 - (1 - c.confidence) / 2 ** (looks - 1)
    early = early_rows(cfg.output.url, num_layers)
    E = sum(len(v) for v in early.values())
    N = cert["answered"]
    if not E or not N:
        return None
    seen = (cert["audit_early_disagree"] + 0.5) / (cert["audit_early"] + 1)  # early-row rate, pulled off zero
    if cert.get("head"):  # that audit compared with the model's own head: its head's own rate on top
        seen += cert["head"]["disagreements"] / max(1, cert["head"]["rows"]) * N / E
    budget = constraint * N / E
    if seen >= budget:
        return None
    n = min(E, math.ceil(1.25 * rows_to_certify(seen, budget, level)))
    if n >= 1_000_000:
        return None
    echo(f"topping up the audit: {n} of the {E} early-exit rows, drawn uniformly, through the original model")
    flat = [(s, int(r)) for s, rows in sorted(early.items()) for r in rows]
    pick = np.random.default_rng(c.seed + 1).choice(len(flat), size=n, replace=False)
    targets: dict[int, list] = {}
    for k in pick:
        targets.setdefault(flat[k][0], []).append(flat[k][1])
    counts = rerun(cfg, shards, {s: np.sort(np.asarray(v)) for s, v in targets.items()}, num_layers)
    return certify(fresh_evidence(cfg.output.url, shards, counts), constraint, level, audit_in_early=False) | {"looks": looks}


def fresh_evidence(output_url: str, shards: list[Shard], counts: dict[int, dict]) -> list[dict]:
    """Per-part counts for a certificate resting on a fresh sample: the parts' current counts (re-run rows
    are exact now), with the fresh sample's rows and disagreements as the audit of the early rows."""
    parts = sink.part_stats(output_url, {s.shard for s in shards})
    by_shard: dict[int, list[dict]] = {}
    for p in parts:
        by_shard.setdefault(p["shard"], []).append(p)
    out = []
    for shard, ps in by_shard.items():
        c = counts.get(shard, {"rows": 0, "disagree": 0})
        for k, p in enumerate(ps):  # a shard's fresh counts go on its first part (they are summed anyway)
            p = dict(p)
            p["audit_early"], p["audit_early_disagree"] = (c["rows"], c["disagree"]) if k == 0 else (0, 0)
            out.append(p)
    return out


def repair(cfg, shards: list[Shard], cert: dict, constraint: float, num_layers: int,
           parts: list[int] | str | None = None, echo=print) -> dict:
    """Re-run every early-exit row of `parts` (default: those where the audit saw disagreements; "all": every
    part), then top up the audit of the rest. Returns the new certificate."""
    from pipeline.offline.certificate import certify

    if parts == "all":
        parts = [s.shard for s in shards]
    chosen = set(parts if parts is not None else cert.get("parts_with_disagreements") or [])
    early = early_rows(cfg.output.url, num_layers)
    targets = {s: v for s, v in early.items() if s in chosen}
    echo(f"repair: re-running {sum(len(v) for v in targets.values())} early-exit rows of parts {sorted(chosen)} "
         "through the original model")
    rerun(cfg, shards, targets, num_layers)
    parts_now = sink.part_stats(cfg.output.url, {s.shard for s in shards})
    # The parts' stored audit counts were the evidence that chose them: only a fresh sample may certify now
    # (sized from the rate the whole audit saw). Without early rows left, the output is exact.
    stale = [dict(p, audit_early=0, audit_early_disagree=0) for p in parts_now]
    new = certify(stale, constraint, cfg.certify.confidence) | {"looks": cert.get("looks", 1)}
    if new["certified"]:
        return new
    sized = {**cert, "answered": new["answered"]}
    return top_up(cfg, shards, sized, constraint, num_layers, echo) or new
