"""The certified accuracy of a job's output: an interval for its agreement with the float original model.

Every answered row of the output is one of two kinds:
- exact: answered by the float original itself (calibration rows, rows reached before the calibration
  decision, and for an uncompressed float32 model the bulk rows no ramp answered): they agree by construction;
- early: answered by anything else: a ramp, or the head of a compressed (int8, float16, bfloat16) model. The
  audit, a Bernoulli sample of the bulk rows drawn from a hash of their position (independent of their content
  and of when they ran), runs to the end with them and through the float original, so its early rows are a
  uniform sample of the early rows with their true agreement known.

Disagreements of the output: a count among the early rows, of which the audit is a uniform sample drawn
without replacement; its exact hypergeometric interval gives the output's interval. The same per part (wide: a part holds few audit rows).

When the audit compares the early rows with the running model's own head instead (no second model in the bulk,
`head`), an answer can differ from the original's only where it differs from its own head or that head differs
from the original's: disagreements <= the audit's count + the head's count over the bulk, the second bounded
from the calibration sample (a uniform sample of the job's rows, every one run through both). Each term's exact
interval at half the error, and their sum (a union bound) is the output's interval.
"""
from __future__ import annotations

from typing import Any

from pipeline.control.stats import hypergeom_count_interval

COUNTS = ("rows", "answered", "calibration", "exact", "early", "audit", "audit_disagree", "audit_early",
          "audit_early_disagree", "ramp", "audit_ramp", "audit_ramp_disagree")
"""`ramp`: the early rows a ramp answered (the rest of them reached the running model's head), and the audit among
them: where an answer can differ from the model's own head."""

OWN_HEAD = "own head"
"""What the audit compares with when the union bound certifies (`with_head`); otherwise the float original."""


def half_error(confidence: float) -> float:
    """The confidence of each of a union bound's two terms: half the error each, `confidence` together."""
    return 1 - (1 - confidence) / 2


def interval_of(c: dict, confidence: float, audit_in_early: bool = True) -> dict[str, Any]:
    """The output's agreement and its exact interval. The audited rows are a uniform sample drawn without
    replacement from a finite set of rows (the early rows; after a top-up, the early rows then, of which the
    audited ones are now answered by the original), so the disagreements among them are a hypergeometric count."""
    answered, early, n, d = c["answered"], c["early"], c["audit_early"], c["audit_early_disagree"]
    if not answered:
        return {"agreement": None, "interval": None}
    drawn_from = early if audit_in_early else early + n
    lo, hi = hypergeom_count_interval(d, n, drawn_from, confidence) if n else (0, drawn_from)
    seen = 0 if audit_in_early else d  # disagreements the sample found and the original now answers
    estimate = early * d / n if n else None
    return {"agreement": None if estimate is None else 1 - estimate / answered,
            "interval": [1 - (hi - seen) / answered, 1 - (lo - seen) / answered]}


def with_head(c: dict, head: dict, confidence: float, job_answered: int | None = None) -> dict[str, Any]:
    """The output's agreement and interval when its audit compared with the running model's own head (`c`'s
    audit counts) and `head` ({"rows", "disagreements"}) is that head against the float original on the
    calibration sample: a union bound, each term's exact interval at half the error (see the module).
    `job_answered`: `c` is one part of a job with that many answered rows (the head's bound is the job's: a part
    may hold all of it, or none)."""
    answered = c["answered"]
    if not answered:
        return {"agreement": None, "interval": None}
    half = half_error(confidence)
    # only a ramp's answer can differ from the model's own head: the audit's rows a ramp answered are a uniform
    # sample of those rows
    n, d, ramp = c.get("audit_ramp", 0), c.get("audit_ramp_disagree", 0), c.get("ramp", 0)
    lo_e, hi_e = hypergeom_count_interval(d, n, ramp, half) if n else (0, ramp)
    m, k = head["rows"], head["disagreements"]
    population = max(job_answered or answered, m)
    lo_h, hi_h = hypergeom_count_interval(k, m, population, half) if m else (0, population)
    # the sample's own rows were answered by the original; only the rows the model answered can hold the rest
    lo_h, hi_h = (0 if job_answered else lo_h - k), min(hi_h - k, c["early"])
    est = ((ramp * d / n if n else 0.0) + c["early"] * k / m) if m else None
    lo = max(0, lo_h - hi_e, lo_e - hi_h)
    return {"agreement": None if est is None else 1 - min(est, answered) / answered,
            "interval": [1 - min(answered, hi_e + hi_h) / answered, 1 - lo / answered]}


def certify(parts: list[dict], constraint: float, confidence: float = 0.95,
            audit_in_early: bool = True, head: dict | None = None) -> dict[str, Any]:
    """The job's certificate from its parts' counts (COUNTS, plus "shard" and "first_row" per part).
    `audit_in_early` False: the audited rows were re-run and are answered by the original now (a top-up).
    `head`: the audit compared with the running model's own head, and this is that head against the float
    original on the calibration sample ({"rows", "disagreements"}; `with_head`)."""
    total = {k: sum(int(p.get(k, 0)) for p in parts) for k in COUNTS}
    overall = interval_of(total, confidence, audit_in_early) if head is None else with_head(total, head, confidence)
    iv = overall["interval"]
    certified = iv is None or iv[0] >= 1 - constraint - 1e-12
    per_part = []
    for p in sorted(parts, key=lambda p: (p["shard"], p.get("first_row", 0))):
        counts = {k: int(p.get(k, 0)) for k in COUNTS}
        per_part.append({"shard": p["shard"], "first_row": p.get("first_row", 0), **counts,
                         **(interval_of(p, confidence, audit_in_early) if head is None else
                            with_head(counts, head, confidence, total["answered"]))})
    method = (f"exact hypergeometric {100 * confidence:g}% two-sided over the audited rows not answered by the "
              "float original (a ramp's, or a compressed head's); rows the float original answered count as agreeing")
    if head is not None:
        method = (f"union bound of two exact hypergeometric intervals, {100 * confidence:g}% together: the audited "
                  "rows against the running model's own head, and that head against the float original on the "
                  "calibration sample; rows the float original answered count as agreeing (a part's interval: the "
                  "job's bound on the head may lie anywhere, so it is wide)")
    out = {
        "method": method,
        "constraint": constraint,
        "promise": 1 - constraint,
        "confidence": confidence,
        **overall,
        "certified": certified,
        "audit_in_early": audit_in_early,
        **({"audit_against": OWN_HEAD, "head": head} if head is not None else {}),
        **total,
        "parts": per_part,
    }
    if not certified:
        # The parts whose audit rows disagreed, most first: where the shortfall was seen (wide intervals:
        # parts with none may still hold disagreements).
        seen = [p for p in per_part if p["audit_early_disagree"]]
        out["parts_with_disagreements"] = [p["shard"] for p in sorted(seen, key=lambda p: -p["audit_early_disagree"])]
    return out


def describe(cert: dict) -> str:
    """One line for the CLI: the estimate, its interval, and whether the promise is kept."""
    if cert.get("agreement") is None:
        if cert.get("interval") is None:
            return "certificate: no answered rows"
        lo, hi = cert["interval"]
        return (f"certificate: no audited early-exit rows; agreement in [{lo:.2%}, {hi:.2%}] — "
                f"{'kept' if cert['certified'] else 'NOT certified'}")
    lo, hi = cert["interval"]
    verdict = (f"promise of >= {cert['promise']:.2%} kept" if cert["certified"] else
               f"PROMISE OF >= {cert['promise']:.2%} NOT CERTIFIED (lower end under it)")
    evidence = (f"{cert['audit_early']} audited of the {cert['early']} rows it did not answer itself"
                if cert.get("looks", 1) == 1 else
                f"a fresh sample of {cert['audit_early']} rows it had not answered, re-run (and now answered) by it; "
                f"{cert['early']} such rows left")
    if cert.get("head"):
        h = cert["head"]
        evidence = (f"{cert['audit_ramp']} audited of the {cert['ramp']} rows a ramp answered, against its own head, "
                    f"plus that head against the original on {h['rows']} calibration rows "
                    f"({h['disagreements']} disagreements)")
    return (f"agreement with the float original {cert['agreement']:.2%}, {cert['method'].split(' over')[0].split(':')[0]} "
            f"interval [{lo:.2%}, {hi:.2%}] from {evidence}: {verdict}")


def describe_cost(cert: dict) -> str | None:
    """One line for the CLI: what the promise cost, as shares of the actors' time (None when not measured)."""
    cost = cert.get("cost") or {}
    said = []
    if cost.get("calibration_share_of_actor_time") is not None and cost.get("calibration_actor_seconds"):
        said.append(f"calibration {cost['calibration_share_of_actor_time']:.0%} of the actors' time "
                    f"({cost['calibration_actor_seconds']:.1f} s, decided {cost.get('calibration_decided_after_seconds') or 0:.1f}"
                    " s into the job)")
    if cost.get("rows_answered_in_full_before_the_decision"):
        said.append(f"{cost['rows_answered_in_full_before_the_decision']} rows answered in full before it "
                    f"({cost['before_decision_share_of_actor_time']:.0%})")
    if cost.get("reference_share_of_actor_time"):
        bulk = cost.get("bulk_reference_share_of_actor_time")
        said.append(f"the float original beside it {cost['reference_share_of_actor_time']:.0%}"
                    + ("" if bulk is None else f" ({bulk:.0%} on the bulk's audit and feedback rows, the rest in calibration)"))
    if cost.get("feedback_share_of_actor_time_estimated") is not None:
        said.append(f"audit and feedback rows run to the end ~{cost['feedback_share_of_actor_time_estimated']:.0%} "
                    f"(their {cost['feedback_share_of_bulk_layer_work']:.0%} of the bulk's layer work)")
    return "the promise cost: " + "; ".join(said) if said else None
