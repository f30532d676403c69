"""Certifying exit thresholds on a sample of the job's own corpus (Learn then Test, fixed-sequence testing).

The greedy tuner fits thresholds to the rows it sees, so its agreement on those rows says little about new
rows. Calibration splits a uniform sample of the corpus, every ramp recorded, in two:

- the tune split (with any other rows independent of the test split, e.g. the artifact's validation
  feedback) fixes a shape: the greedy search's thresholds at the full budget. The path scales every ramp's
  distance from 1.0 by the same factor, in steps of 0.025 from nearly closed to twice the shape. (A greedy
  search at a small target is no cautious start: it takes every move that costs nothing on the tune rows,
  and such moves overfit.) All of it is fixed before the test split is looked at;
- the test split walks the path in that order. At each point the null hypothesis is "this threshold set
  disagrees with the original model on more than `constraint` of the corpus"; it is rejected when the test
  split's disagreements are too few for that (exact binomial tail <= delta). The walk stops at the first
  point not rejected, and the last rejected point is the answer.

Fixed-sequence testing controls the family-wise error at delta without a multiplicity correction (Angelopoulos
et al., "Learn then Test", 2021), so with probability >= 1 - delta the chosen thresholds' disagreement over
the distribution the sample came from is at most `constraint`. When even the first point fails, every ramp
stays closed: the job then runs the original model, which agrees by construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

from .stats import binom_cdf, clopper_pearson, rows_to_certify
from .tuner import evaluate, tune_thresholds

__all__ = ["Calibration", "Candidate", "bulk_budget", "calibrate_candidates", "calibrate_sample", "calibration_rows",
           "certify_thresholds", "split_rows", "walk_path"]

TUNE_SHARE = 0.3
"""Share of the calibration sample that builds the path; the rest tests it (the test split sets the power)."""


def calibration_rows(constraint: float, delta: float = 0.05, design_rate: float = 0.5) -> int:
    """Calibration sample size: enough test rows to certify thresholds whose true disagreement is
    `design_rate` of the budget (exact one-sided bound at 1 - delta), plus the tune split on top.
    A 1% budget at delta 0.05: 1,049 test rows + 450 tune rows (1,499)."""
    if not 0 < constraint < 1:
        raise ValueError(f"constraint={constraint} must be in (0, 1) to calibrate")
    test = rows_to_certify(constraint * design_rate, constraint, confidence=1 - 2 * delta)
    return math.ceil(test / (1 - TUNE_SHARE))


def bulk_budget(constraint: float, total_rows: int, calibration_rows: int) -> float:
    """The disagreement the bulk's thresholds may have: the calibration rows are answered by the original head,
    so they agree by construction, and the bulk's disagreements are spread over every row of the output
    (1,499 exact rows of 10,568 let the bulk disagree on 1.17% at a 1% promise)."""
    bulk = total_rows - calibration_rows
    return constraint * total_rows / bulk if bulk > 0 else constraint


def split_rows(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(tune, test) row indices of an n-row sample, at random (seeded)."""
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(TUNE_SHARE * n))
    return np.sort(order[:k]), np.sort(order[k:])


@dataclass
class Calibration:
    """Certified thresholds and the evidence for them."""

    thresholds: np.ndarray
    """[R] the last threshold set the test split certified (all CLOSED when none was)."""
    constraint: float
    delta: float
    tune_rows: int
    test_rows: int
    chosen: int
    """Index of the chosen point on the path; -1 when none passed (all ramps closed)."""
    test_disagreements: int
    """Disagreements of the chosen thresholds on the test split."""
    upper_bound: float
    """One-sided (1 - delta) Clopper-Pearson upper bound of their disagreement rate, from the test split."""
    test_layer_savings: float
    """Layer compute saved on the test split at the chosen thresholds (an estimate for the corpus)."""
    path: list[dict[str, Any]] = field(default_factory=list)

    @property
    def test_rate(self) -> float:
        return self.test_disagreements / self.test_rows if self.test_rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "Learn then Test: a path of scaled greedy thresholds from the tune split, fixed-sequence "
                      "exact binomial tests on the test split",
            "thresholds": [float(x) for x in self.thresholds],
            "constraint": self.constraint,
            "delta": self.delta,
            "tune_rows": self.tune_rows,
            "test_rows": self.test_rows,
            "chosen": self.chosen,
            "test_disagreement": round(self.test_rate, 6),
            "upper_bound": round(self.upper_bound, 6),
            "test_layer_savings": round(self.test_layer_savings, 4),
            "path": self.path,
        }


def certify_thresholds(
    tune: FeedbackWindow,
    test: FeedbackWindow,
    costs: CostModel,
    constraint: float,
    delta: float = 0.05,
    active: np.ndarray | Sequence[bool] | None = None,
    scales: Sequence[float] = tuple(np.round(np.arange(1, 81) / 40, 4)),
) -> Calibration:
    """Thresholds whose disagreement is at most `constraint` with probability >= 1 - delta (see the module).

    `scales`: the path, cautious first: point k is 1 - scales[k] * (1 - shape) per ramp (up to 2x the shape's
    distance from 1.0: a tune split can be pessimistic, and the test decides)."""
    R = costs.num_ramps
    act = np.ones(R, bool) if active is None else np.asarray(active, bool)
    shape = tune_thresholds(tune, costs, constraint, act).thresholds
    points = [np.where(shape < CLOSED, np.clip(1.0 - float(s) * (1.0 - shape), 0.0, CLOSED), CLOSED) for s in scales]
    return walk_path(points, test, costs, constraint, delta, act, tune_rows=len(tune), scales=scales)


def walk_path(points: Sequence[np.ndarray], test: FeedbackWindow, costs: CostModel, constraint: float,
              delta: float = 0.05, active: np.ndarray | Sequence[bool] | None = None, *, tune_rows: int = 0,
              scales: Sequence[float] | None = None) -> Calibration:
    """Fixed-sequence testing along `points` (threshold sets, cautious first, fixed before `test` is looked at):
    point k passes when its disagreements on `test` would be improbable (exact binomial tail <= delta) at a true
    disagreement of `constraint`; the walk stops at the first point that does not pass, and the last that did is
    the answer (every ramp closed when none did). `scales` labels the points in the recorded path."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1), e.g. 0.05")
    R = costs.num_ramps
    act = np.ones(R, bool) if active is None else np.asarray(active, bool)
    n = len(test)
    path: list[dict[str, Any]] = []
    best = np.full(R, CLOSED)
    chosen, wrong_at_best, savings_at_best = -1, 0, 0.0
    for k, thr in enumerate(points):
        out = evaluate(test, costs, thr, act)
        wrong = n - int(round(out.agreement * n))
        p_value = binom_cdf(wrong, n, constraint) if n else 1.0
        passed = p_value <= delta
        path.append({**({"scale": float(scales[k])} if scales is not None else {"point": k}),
                     "thresholds": [round(float(x), 6) for x in thr],
                     "test_disagreements": wrong, "p_value": round(p_value, 6), "passed": passed,
                     "test_layer_savings": round(out.layer_savings, 4)})
        if not passed:
            break
        best, chosen, wrong_at_best, savings_at_best = thr, len(path) - 1, wrong, out.layer_savings
    upper = clopper_pearson(wrong_at_best, n, 1 - 2 * delta)[1] if n else 1.0
    return Calibration(best, constraint, delta, tune_rows, n, chosen, wrong_at_best, upper, savings_at_best, path)


def calibrate_sample(sample: FeedbackWindow, warm: FeedbackWindow | None, costs: CostModel, budget: float,
                     delta: float = 0.05, active: np.ndarray | Sequence[bool] | None = None,
                     seed: int = 0) -> Calibration:
    """What a job does with its calibration sample (every ramp recorded): split it (seeded), shape the path on
    the tune split plus `warm`, certify on the test split at `budget` (the bulk's, see `bulk_budget`).

    `warm`: the artifact's validation feedback, or None. It is independent of the test split, so the guarantee
    holds whatever it looks like, and in-domain it makes a better shape than the tune split alone (30 simulated
    calibrations of the movie-review corpus: 35.8% vs 34.1% layer work saved; nyt-editorials 25.3% vs 24.7%)."""
    tune_idx, test_idx = split_rows(len(sample), seed)
    tune = sample.take(tune_idx)
    if warm is not None:
        tune = FeedbackWindow.concat([tune, warm])
    return certify_thresholds(tune, sample.take(test_idx), costs, budget, delta, active=active)


@dataclass
class Candidate:
    """A model a job could answer its bulk with, as its calibration sample saw it."""

    name: str
    sample: FeedbackWindow
    """Every ramp of this model on the calibration rows, `reference` the float original's answers."""
    warm: FeedbackWindow | None
    """Rows independent of the sample to shape the path with (the artifact's validation feedback), or None."""
    costs: CostModel
    speed: float = 1.0
    """Its seconds per row at full depth, relative to the float original's (measured on the sample)."""
    overhead: float = 0.0
    """More time per row on top, in the same unit: the float original run beside it on the rows audited."""
    head_share: float = 0.0
    """The share of the bulk's budget its own head's disagreement with the float original may take (an upper
    bound measured apart), when `sample` measures its exits against its own head (no `reference`)."""


def calibrate_candidates(candidates: Sequence[Candidate], budget: float, delta: float = 0.05,
                         active: np.ndarray | Sequence[bool] | None = None,
                         seed: int = 0) -> tuple[Candidate, Calibration, list[dict[str, Any]]]:
    """Which model answers the bulk, and its certified thresholds: `calibrate_sample` for the one chosen.

    The choice looks at the tune split alone (with each candidate's `warm` rows for its savings), so the test
    split still certifies a path fixed before it is seen: per candidate, the disagreement of its own head with the
    float original on the tune rows, and the time a row costs at its greedy thresholds (`speed` x (1 - savings),
    plus its `overhead`).
    A model whose head alone would likely fail the test's first point (the upper end of a 75% one-sided interval
    of its tune-split rate, counted over the test split, not rejected at delta) is passed over; the float original
    never disagrees with itself. A candidate with a `head_share` is certified at what is left of the budget (none
    left: passed over). The quickest of the rest wins. Returns (the chosen candidate, its calibration, what was
    estimated for each)."""
    n = len(candidates[0].sample)
    if any(len(c.sample) != n for c in candidates):
        raise ValueError("candidates must be recorded on the same calibration rows")
    tune_idx, test_idx = split_rows(n, seed)
    act = np.ones(candidates[0].costs.num_ramps, bool) if active is None else np.asarray(active, bool)
    estimates = []
    for c in candidates:
        own = c.sample.take(tune_idx)
        mine = budget - c.head_share
        wrong = int(len(own) - own.final_ok.sum())
        head = wrong / len(own) if len(own) else 0.0
        head_up = clopper_pearson(wrong, len(own), 0.5)[1] if len(own) and wrong < len(own) else 1.0
        feasible = mine > 0 and (wrong == 0 or binom_cdf(math.ceil(head_up * len(test_idx)), len(test_idx), mine) <= delta)
        tune = own if c.warm is None else FeedbackWindow.concat([own, c.warm])
        shape = tune_thresholds(tune, c.costs, max(mine, 0.0), act).thresholds
        saved = evaluate(tune, c.costs, shape, act).savings
        estimates.append({"candidate": c.name, "speed": round(c.speed, 4), "head_disagreement": round(head, 6),
                          "budget": round(mine, 6), "feasible": bool(feasible), "estimated_savings": round(saved, 4),
                          "estimated_time_per_row": round(c.speed * (1.0 - saved) + c.overhead, 4)})
    feasible = [k for k, e in enumerate(estimates) if e["feasible"]] or [0]
    best = min(feasible, key=lambda k: estimates[k]["estimated_time_per_row"])
    chosen = candidates[best]
    cal = calibrate_sample(chosen.sample, chosen.warm, chosen.costs, max(budget - chosen.head_share, 1e-9), delta,
                           active, seed)
    return chosen, cal, estimates
