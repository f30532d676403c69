"""Calibration designs (`offramp bench calibration`): what certifying a job costs in layer work, and what other
designs would save, replayed on one recording of a corpus.

The corpus runs once through the whole model with every ramp recorded (cached per artifact and corpus). Each
design is then replayed over `seeds` independent draws: its calibration rows are answered by the original head,
the bulk (every other row, in corpus order) at the thresholds the design certifies. Per design: the output's true
agreement with the original model over every row, how often it broke the promise, and the layer work saved (each
row counted at its answer, calibration rows at the last layer). In the same run, the baselines: the artifact's own
thresholds over every row (what an uncertified job starts from) and thresholds fitted to every row at the full
budget (an oracle no job has). What a live job adds (the guard's back-offs, the audit, feedback rows) is left
out: `offramp bench accuracy` runs the real jobs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.bench import machine, write_result
from pipeline.control.calibration import (TUNE_SHARE, bulk_budget, calibrate_sample, calibration_rows,
                                          certify_thresholds, walk_path)
from pipeline.control.stats import binom_cdf
from pipeline.control.tuner import evaluate, tune_thresholds
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow


@dataclass
class Corpus:
    """A recorded corpus and what the designs need from the artifact."""

    rows: FeedbackWindow
    """Every row of the corpus, every ramp recorded, in corpus order."""
    warm: FeedbackWindow | None
    """The artifact's validation feedback (shapes the path, as in a job), or None."""
    costs: CostModel
    active: np.ndarray
    artifact_thresholds: np.ndarray
    constraint: float
    max_share: float = 0.15
    """A job's `certify.max_calibration_share`."""

    def __len__(self) -> int:
        return len(self.rows)

    def sample_size(self, delta: float) -> int:
        return min(calibration_rows(self.constraint, delta), int(self.max_share * len(self)))


Schedule = list[tuple[int, np.ndarray]]
"""(position in the bulk where they take over, thresholds): the thresholds the bulk runs at, in order."""


def outcome(c: Corpus, calibrated: np.ndarray, schedule: Schedule) -> tuple[float, float]:
    """(agreement of the output with the original model, layer work saved) when the rows `calibrated` are
    answered by the original head and the rest, in corpus order, at `schedule`."""
    bulk = np.setdiff1d(np.arange(len(c)), calibrated)
    wrong, saved = 0, 0.0
    for k, (start, thr) in enumerate(schedule):
        end = schedule[k + 1][0] if k + 1 < len(schedule) else len(bulk)
        if end <= start:
            continue
        out = evaluate(c.rows.take(bulk[start:end]), c.costs, thr, c.active)
        wrong += (end - start) - int(round(out.agreement * (end - start)))
        saved += out.layer_savings * (end - start)
    return 1 - wrong / len(c), saved / len(c)


def _draw(c: Corpus, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(len(c), size=n, replace=False)


def fixed_sample(c: Corpus, seed: int, *, credit: bool = True, delta: float = 0.05, oracle_shape: bool = False,
                 path: list[np.ndarray] | None = None, n: int | None = None) -> tuple[np.ndarray, Schedule]:
    """The job's design: one uniform sample sized by the constraint (or `n` rows), certified once. `credit`:
    tested at the bulk's budget (the calibration rows agree by construction), else at the bare constraint (the
    earlier build). `oracle_shape`: the path's shape fitted on every row of the corpus instead of the tune split;
    `path`: a given path walked instead (both are bounds on the tune split's part)."""
    n = n or c.sample_size(delta)
    idx = _draw(c, n, seed)
    budget = bulk_budget(c.constraint, len(c), n) if credit else c.constraint
    test = c.rows.take(idx[int(round(TUNE_SHARE * n)):])
    if path is not None:
        thr = walk_path(path, test, c.costs, budget, delta, c.active).thresholds
    elif oracle_shape:
        thr = certify_thresholds(c.rows, test, c.costs, budget, delta, active=c.active).thresholds
    else:
        thr = calibrate_sample(c.rows.take(idx), c.warm, c.costs, budget, delta, c.active, seed).thresholds
    return idx, [(0, thr)]


def greedy_path(c: Corpus, rows: FeedbackWindow, targets=tuple(np.linspace(0.0005, 0.014, 28))) -> list[np.ndarray]:
    """Greedy tunes of `rows` at rising targets: the path a job would walk if it could tune on every row."""
    return [tune_thresholds(rows, c.costs, t, c.active).thresholds for t in targets]


def _split_fixed(c: Corpus, seed: int) -> np.ndarray:
    """Tune membership per corpus row, fixed before any look (a row never moves between splits)."""
    return np.random.default_rng(seed + 1).random(len(c)) < TUNE_SHARE


def _tune_window(c: Corpus, rows: np.ndarray) -> FeedbackWindow:
    tune = c.rows.take(rows)
    return FeedbackWindow.concat([tune, c.warm]) if c.warm is not None else tune


def group_sequential(c: Corpus, seed: int, *, looks: tuple[float, ...] = (0.5, 1.0, 2.0),
                     deltas: tuple[float, ...] = (0.025, 0.0125, 0.0125)) -> tuple[np.ndarray, Schedule]:
    """Calibration in rounds: looks at `looks` x the job's sample size, look k tested at `deltas[k]` (their sum
    is the job's delta: a union bound over looks). After each look it stops when drawing to the next look is not
    expected to pay for itself: the path points the next look would pass at their present rates, times the rows
    left after it, against what the present point saves on the rows left now."""
    base = c.sample_size(sum(deltas))
    sizes = [min(int(f * base), len(c) // 2) for f in looks]
    order = np.random.default_rng(seed).permutation(len(c))
    is_tune = _split_fixed(c, seed)
    for k, n in enumerate(sizes):
        idx = order[:n]
        budget = bulk_budget(c.constraint, len(c), n)
        test = c.rows.take(idx[~is_tune[idx]])
        cal = certify_thresholds(_tune_window(c, idx[is_tune[idx]]), test, c.costs, budget, deltas[k],
                                 active=c.active)
        if k + 1 == len(sizes):
            break
        now = (1 - n / len(c)) * (cal.path[cal.chosen]["test_layer_savings"] if cal.chosen >= 0 else 0.0)
        n2 = sizes[k + 1]
        m2, b2, later = round(n2 * (1 - TUNE_SHARE)), bulk_budget(c.constraint, len(c), n2), 0.0
        for point in cal.path:
            rate = point["test_disagreements"] / max(len(test), 1)
            if binom_cdf(int(rate * m2), m2, b2) > deltas[k + 1]:
                break
            later = point["test_layer_savings"]
        if (1 - n2 / len(c)) * later <= now:
            break
    return idx, [(0, cal.thresholds)]


def recertified_in_bulk(c: Corpus, seed: int, *, audit: float = 0.12, window: int = 2048,
                        delta: float = 0.05) -> tuple[np.ndarray, Schedule]:
    """The job's sample certifies at delta / 2; then every `window` bulk rows the audit rows so far (a Bernoulli
    `audit` share of the bulk, run to the end) join the test split and the path is tested again at
    delta / 2 / (bulk windows), moving to a bolder point when one passes."""
    n = c.sample_size(delta)
    order = np.random.default_rng(seed).permutation(len(c))
    idx = order[:n]
    is_tune = _split_fixed(c, seed)
    tune = _tune_window(c, idx[is_tune[idx]])
    test_rows = idx[~is_tune[idx]]
    budget = bulk_budget(c.constraint, len(c), n)
    bulk = np.setdiff1d(np.arange(len(c)), idx)
    looks = max(1, -(-len(bulk) // window))
    cal = certify_thresholds(tune, c.rows.take(test_rows), c.costs, budget, delta / 2, active=c.active)
    chosen, schedule = cal.chosen, [(0, cal.thresholds)]
    audited = np.random.default_rng(seed + 2).random(len(c)) < audit
    for start in range(window, len(bulk), window):
        seen = bulk[:start]
        test = c.rows.take(np.concatenate([test_rows, seen[audited[seen]]]))
        again = certify_thresholds(tune, test, c.costs, budget, delta / 2 / looks, active=c.active)
        if again.chosen > chosen:
            chosen = again.chosen
            schedule.append((start, again.thresholds))
    return idx, schedule


def designs(c: Corpus) -> dict[str, Callable[[int], tuple[np.ndarray, Schedule]]]:
    none = np.zeros(0, np.int64)
    oracle = tune_thresholds(c.rows, c.costs, c.constraint, c.active).thresholds
    cache: list = []

    def rich() -> list[np.ndarray]:  # computed once, on first use
        if not cache:
            cache.append(greedy_path(c, c.rows))
        return cache[0]

    return {
        "artifact thresholds, no calibration (uncertified start)": lambda s: (none, [(0, c.artifact_thresholds)]),
        "oracle: thresholds fitted to every row (not runnable)": lambda s: (none, [(0, oracle)]),
        "certified at the bare constraint (previous build)": lambda s: fixed_sample(c, s, credit=False),
        "certified at the bulk's budget (the job)": lambda s: fixed_sample(c, s),
        "  same, path shaped on every row (a bound on shaping)": lambda s: fixed_sample(c, s, oracle_shape=True),
        "  same, greedy path tuned on every row (a bound on the path)": lambda s: fixed_sample(c, s, path=rich()),
        "  same at 1,000 rows, greedy path tuned on every row": lambda s: fixed_sample(c, s, path=rich(), n=1000),
        "  same, 90% confidence": lambda s: fixed_sample(c, s, delta=0.1),
        "group-sequential, looks at 0.5/1/2x the sample": lambda s: group_sequential(c, s),
        "re-certified in the bulk from 12% audit rows": lambda s: recertified_in_bulk(c, s),
    }


def simulate(c: Corpus, seeds: int = 30, only: list[str] | None = None) -> list[dict]:
    """One row per design: its output over `seeds` draws (deterministic designs run once)."""
    results = []
    for name, design in designs(c).items():
        if only and not any(o in name for o in only):
            continue
        runs = 1 if "no calibration" in name or "oracle" in name else seeds
        t = time.perf_counter()
        agree, saved, cal_rows = [], [], []
        for seed in range(runs):
            calibrated, schedule = design(seed)
            a, s = outcome(c, calibrated, schedule)
            agree.append(a), saved.append(s), cal_rows.append(len(calibrated))
        results.append({
            "design": name, "runs": runs, "calibration_rows": float(np.mean(cal_rows)),
            "agreement_mean": float(np.mean(agree)), "agreement_min": float(np.min(agree)),
            "runs_under_promise": int(np.sum(np.asarray(agree) < 1 - c.constraint - 1e-12)),
            "saved_mean": float(np.mean(saved)), "saved_p10": float(np.percentile(saved, 10)),
            "seconds": round(time.perf_counter() - t, 2),
        })
    base = results[0]["saved_mean"] if results and "no calibration" in results[0]["design"] else None
    for r in results:
        r["saved_vs_uncertified"] = None if not base else r["saved_mean"] / base
    return results


def bound(c: Corpus, targets=(0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008), delta: float = 0.05,
          scales=(1, 5, 10)) -> list[dict]:
    """What any certified job could save: thresholds fitted to every row at a target disagreement (an oracle),
    their true disagreement p, and the calibration rows a test passing at its median needs to certify p against
    the bulk's budget (test rows where the binomial tail at p's count is <= delta, / (1 - TUNE_SHARE)). Job saved
    = (1 - calibration rows / N) x the oracle's saving, for the corpus and for corpora `scales` x larger (a
    bisection over the sample size: approximate, as the binomial count's sawtooth is not quite monotone)."""
    out = []
    for target in targets:
        thr = tune_thresholds(c.rows, c.costs, target, c.active).thresholds
        o = evaluate(c.rows, c.costs, thr, c.active)
        p = 1 - o.agreement
        row = {"target": target, "true_disagreement": p, "oracle_saved": o.layer_savings}
        for k in scales:
            n_total = k * len(c)

            def certifies(n: int) -> bool:  # more rows: more test rows and a larger bulk budget, so monotone
                m = int(n * (1 - TUNE_SHARE))
                return binom_cdf(int(p * m), m, bulk_budget(c.constraint, n_total, n)) <= delta

            lo, hi = 10, n_total - 1
            if not certifies(hi):
                lo = n_total  # not certifiable below the whole corpus: nothing saved
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if certifies(mid) else (mid + 1, hi)
            n = lo
            row[f"calibration_rows_{k}x"] = n
            row[f"job_saved_{k}x"] = (1 - n / n_total) * o.layer_savings
        out.append(row)
    return out


def format_bound(rows: list[dict], scales=(1, 5, 10)) -> str:
    head = "| true disagreement p | oracle saved | " + " | ".join(
        f"calibration rows, job saved at {k}x" for k in scales) + " |"
    lines = [head, "|" + "---|" * (2 + len(scales))]
    for r in rows:
        lines.append(f"| {r['true_disagreement']:.2%} | {r['oracle_saved']:.2%} | " + " | ".join(
            f"{r[f'calibration_rows_{k}x']:,}, {r[f'job_saved_{k}x']:.2%}" for k in scales) + " |")
    return "\n".join(lines)


def format_table(results: list[dict], constraint: float) -> str:
    head = (f"| design | runs | calibration rows | agreement mean (min) | runs under {1 - constraint:.0%} | "
            "layer work saved mean (p10) | vs uncertified |")
    lines = [head, "|" + "---|" * 7]
    for r in results:
        vs = "-" if r["saved_vs_uncertified"] is None else f"{r['saved_vs_uncertified']:.0%}"
        lines.append(f"| {r['design'].strip()} | {r['runs']} | {r['calibration_rows']:.0f} | "
                     f"{r['agreement_mean']:.2%} ({r['agreement_min']:.2%}) | {r['runs_under_promise']} | "
                     f"{r['saved_mean']:.2%} ({r['saved_p10']:.2%}) | {vs} |")
    return "\n".join(lines)


def load_corpus(model: str, corpus: str, cache_dir: str = "bench_results/recordings", echo=print) -> Corpus:
    """Record every ramp over the built-in corpus `corpus` (or reuse the recording of this artifact and corpus)."""
    import pyarrow.parquet as pq

    from pipeline.control.deployment import controller_constraint, cost_model, warm_start_window
    from pipeline.engine.ramp_outputs import record_ramps, recording_path
    from pipeline.model.artifact import fingerprint, read_manifest
    from pipeline.offline.job import materialize_builtin

    manifest = read_manifest(model)
    texts = pq.read_table(materialize_builtin(f"builtin:{corpus}"), columns=["text"]).column("text").to_pylist()
    path = recording_path(cache_dir, corpus, fingerprint(model), texts)
    if path.exists():
        z = np.load(path)
        rows = FeedbackWindow(z["conf"], z["pred"], z["final"])
        echo(f"{corpus}: reusing the recording {path} ({len(rows)} rows)")
    else:
        echo(f"{corpus}: recording every ramp over {len(texts)} rows (once per artifact and corpus)")
        rows = record_ramps(model, texts)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, conf=rows.conf, pred=rows.pred, final=rows.final)
    active = np.asarray(manifest.active, bool)
    thresholds = np.where(active, np.asarray(manifest.thresholds, np.float64), CLOSED)
    return Corpus(rows, warm_start_window(model, manifest), cost_model(manifest), active, thresholds,
                  controller_constraint(manifest))


def run_calibration_bench(model: str, corpora: str = "movie-reviews", seeds: int = 30,
                          out_json: str | None = "bench_results/calibration.json", echo=print) -> dict:
    out = {"model": model, "seeds": seeds, "corpora": {}}
    for corpus in corpora.split(","):
        c = load_corpus(model, corpus, echo=echo)
        results, limit = simulate(c, seeds), bound(c)
        out["corpora"][corpus] = {"rows": len(c), "constraint": c.constraint, "results": results, "bound": limit}
        echo(f"\n{corpus}: {len(c)} rows, constraint {c.constraint:.2%}, {seeds} draws per design "
             f"(layer work saved counts each row at its answer; calibration rows at the last layer)")
        echo(format_table(results, c.constraint))
        echo(f"\nthe bound on {corpus}: oracle thresholds at each true disagreement, the rows to certify it "
             "(a test passing at its median), on this corpus and on corpora 5x and 10x larger")
        echo(format_bound(limit))
    out["machine"] = machine()
    write_result(out, out_json, echo)
    return out
