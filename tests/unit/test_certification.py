"""The statistics behind an offline job's accuracy promise: intervals, calibration, the certificate, the guard."""
import math

import numpy as np
import pytest

from pipeline.config import TuningConfig
from pipeline.control.calibration import bulk_budget, calibration_rows, certify_thresholds, split_rows
from pipeline.control.controller import ThresholdController
from pipeline.control.stats import binom_cdf, binom_sf, clopper_pearson, rows_to_certify, wilson
from pipeline.control.synthetic import synthetic_window
from pipeline.control.tuner import evaluate, tune_thresholds
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow
from pipeline.offline.certificate import certify, describe_cost

SKILLS = [0.45, 0.55, 0.65, 0.8, 0.9]
COSTS = CostModel.uniform(6, [1, 2, 3, 4, 5], ramp_cost=0.004)


def _pmf(k, n, p):
    return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                    + k * math.log(p) + (n - k) * math.log1p(-p))


def test_binomial_tails_match_the_exact_sum():
    for n, p in [(50, 0.01), (300, 0.05), (1000, 0.004)]:
        for k in (0, 1, 3, 10):
            exact = sum(_pmf(i, n, p) for i in range(k + 1))
            assert binom_cdf(k, n, p) == pytest.approx(exact, rel=1e-9, abs=1e-15)
            assert binom_sf(k + 1, n, p) == pytest.approx(1 - exact, rel=1e-9, abs=1e-12)


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(50, 100, 0.95)
    assert (lo, hi) == pytest.approx((0.3983, 0.6017), abs=1e-4)  # textbook values
    assert clopper_pearson(0, 50, 0.95) == pytest.approx((0.0, 0.07112), abs=1e-5)  # 1 - 0.025 ** (1/50)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(5, 3)


@pytest.mark.parametrize("n,p", [(n, p) for n in (60, 400, 1500) for p in (0.002, 0.01, 0.05)] + [(60, 0.3), (400, 0.3)])
def test_clopper_pearson_covers_at_the_stated_rate_exactly(n, p):
    """Coverage summed over every outcome (no simulation): at least the confidence, for any true rate."""
    cover = 0.0
    sd = math.sqrt(n * p * (1 - p))
    for k in range(max(0, int(n * p - 12 * sd - 5)), min(n, int(n * p + 12 * sd + 5)) + 1):
        pmf = _pmf(k, n, p)
        if pmf < 1e-15:
            continue
        lo, hi = clopper_pearson(k, n, 0.95)
        cover += pmf * (lo <= p <= hi)
    assert cover >= 0.95 - 1e-9


def test_wilson_brackets_the_estimate():
    lo, hi = wilson(5, 1000)
    assert lo < 0.005 < hi and hi < 0.012


def test_an_audit_planned_at_a_power_clears_the_budget_that_often():
    """Rows planned for the count's 90% quantile: drawn at the planned rate, the interval ends within the budget
    on ~90% of audits; planned for the count expected, on about half."""
    from pipeline.control.stats import binom_quantile

    rng = np.random.default_rng(2)
    for rate, budget in ((0.003, 0.01), (0.02, 0.035)):
        cleared = {}
        for power in (None, 0.9):
            n = rows_to_certify(rate, budget, 0.975, power=power)
            counts = rng.binomial(n, rate, size=2000)
            cleared[power] = np.mean([clopper_pearson(int(k), n, 0.975)[1] <= budget for k in counts])
        assert 0.86 <= cleared[0.9] <= 0.95 and cleared[None] < 0.75, (rate, cleared)
    assert binom_quantile(0.5, 1000, 0.01) in (9, 10) and binom_quantile(0.999, 10, 0.0) == 0


def test_rows_to_certify_grows_as_the_rate_nears_the_budget():
    sizes = [rows_to_certify(r, 0.01) for r in (0.002, 0.004, 0.006, 0.008)]
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[1]
    n = sizes[2]
    assert clopper_pearson(math.floor(0.006 * n), n)[1] <= 0.01
    assert rows_to_certify(0.01, 0.01) == 1_000_000  # a rate at the budget can never be told apart from it
    assert calibration_rows(0.01) > calibration_rows(0.02)


def _sample(rows, seed, shift=0.0):
    return synthetic_window(rows, SKILLS, seed=seed, shift=shift)


def test_calibration_keeps_the_true_disagreement_within_the_budget_with_the_stated_probability():
    """Learn then Test: over independent calibration samples, the certified thresholds break the budget on the
    whole population in at most ~delta of runs (binomial slack for 120 runs), and they save most of what
    thresholds fitted to the population itself at the full budget save (an oracle no job has)."""
    population = _sample(200_000, seed=1)
    n = calibration_rows(0.01, 0.05)
    failures, savings = 0, []
    for run in range(120):
        w = population.take(np.random.default_rng(100 + run).choice(len(population), n, replace=False))
        tune, test = split_rows(len(w), seed=run)
        cal = certify_thresholds(w.take(tune), w.take(test), COSTS, 0.01, 0.05)
        true = evaluate(population, COSTS, cal.thresholds)
        failures += (1 - true.agreement) > 0.01
        savings.append(true.layer_savings)
    assert failures <= binom_ppf_upper(120, 0.05)
    oracle = evaluate(population, COSTS, tune_thresholds(population, COSTS, 0.01).thresholds).layer_savings
    assert np.median(savings) > 0.6 * oracle


def test_exact_calibration_rows_leave_the_bulk_a_larger_share_and_the_output_stays_within_the_promise():
    """The calibration rows are answered by the original head, so the bulk may disagree on
    constraint x rows / bulk rows. Over independent 12,000-row corpora, a job whose bulk runs at thresholds
    certified at that budget keeps its whole output within the constraint in at most ~delta of runs, and
    saves more on average than one certified at the bare constraint."""
    assert bulk_budget(0.01, 10_568, 1_499) == pytest.approx(0.011653, abs=1e-6)
    assert bulk_budget(0.01, 500, 500) == 0.01  # no bulk: nothing to spread
    population = _sample(200_000, seed=7)
    n = calibration_rows(0.01, 0.05)
    failures, gain = 0, []
    for run in range(120):
        rows = np.random.default_rng(300 + run).choice(len(population), 12_000, replace=False)
        cal, bulk = population.take(rows[:n]), population.take(rows[n:])
        tune, test = split_rows(n, seed=run)
        saved = []
        for budget in (bulk_budget(0.01, 12_000, n), 0.01):
            thr = certify_thresholds(cal.take(tune), cal.take(test), COSTS, budget, 0.05).thresholds
            out = evaluate(bulk, COSTS, thr)
            saved.append(out.layer_savings)
            if budget > 0.01:
                failures += (1 - out.agreement) * len(bulk) / 12_000 > 0.01
        gain.append(saved[0] - saved[1])
    assert failures <= binom_ppf_upper(120, 0.05)
    assert np.mean(gain) > 0 and np.median(gain) > 0  # per run either way: the path's shape is fitted at the budget


def binom_ppf_upper(n, p, level=0.999):
    """The count a Binomial(n, p) stays under with probability `level`."""
    k = 0
    while binom_cdf(k, n, p) < level:
        k += 1
    return k


def test_calibration_closes_every_ramp_when_nothing_can_be_certified():
    w = _sample(300, seed=2, shift=0.9)  # ramps nearly always wrong, and only 210 test rows
    tune, test = split_rows(len(w))
    cal = certify_thresholds(w.take(tune), w.take(test), COSTS, 0.01, 0.05)
    assert cal.chosen == -1 and np.all(cal.thresholds == CLOSED)
    assert cal.path and not cal.path[-1]["passed"]


def _parts(rng, early_rate, wrong_rate, audit, rows=1000, n_parts=10):
    """Synthetic parts: each row exits early with `early_rate`; an early row disagrees with `wrong_rate`;
    the audit samples rows at rate `audit`. Returns (parts, true agreement)."""
    parts, wrong_total = [], 0
    for s in range(n_parts):
        early = rng.uniform(size=rows) < early_rate
        wrong = early & (rng.uniform(size=rows) < wrong_rate)
        audited = rng.uniform(size=rows) < audit
        wrong_total += int(wrong.sum())
        parts.append({"shard": s, "first_row": 0, "rows": rows, "answered": rows, "calibration": 0,
                      "exact": int((~early).sum()), "early": int(early.sum()),
                      "audit": int(audited.sum()), "audit_disagree": int((audited & wrong).sum()),
                      "audit_early": int((audited & early).sum()),
                      "audit_early_disagree": int((audited & wrong).sum())})
    return parts, 1 - wrong_total / (rows * n_parts)


def test_the_certificate_interval_covers_the_true_agreement_at_the_stated_rate():
    rng = np.random.default_rng(3)
    covered, runs = 0, 300
    for _ in range(runs):
        parts, truth = _parts(rng, early_rate=0.7, wrong_rate=0.01, audit=0.1)
        lo, hi = certify(parts, 0.01, 0.95)["interval"]
        covered += lo <= truth <= hi
    # 95% nominal; Clopper-Pearson is conservative. 300 runs: below 0.92 would be a real miss.
    assert covered / runs >= 0.92


def test_the_certificate_fails_loudly_when_the_lower_end_is_under_the_promise():
    rng = np.random.default_rng(4)
    parts, truth = _parts(rng, early_rate=0.7, wrong_rate=0.03, audit=0.2)
    cert = certify(parts, 0.01, 0.95)
    assert truth < 0.99 and not cert["certified"]
    assert cert["parts_with_disagreements"] and set(cert["parts_with_disagreements"]) <= set(range(10))
    good, _ = _parts(rng, early_rate=0.7, wrong_rate=0.001, audit=0.2)
    assert certify(good, 0.01, 0.95)["certified"]


def test_rows_answered_by_the_original_head_are_exact_and_an_unaudited_stratum_is_vacuous():
    part = {"shard": 0, "rows": 100, "answered": 100, "calibration": 20, "exact": 60, "early": 40,
            "audit": 0, "audit_disagree": 0, "audit_early": 0, "audit_early_disagree": 0}
    cert = certify([part], 0.01)
    assert cert["interval"] == pytest.approx([0.6, 1.0]) and cert["agreement"] is None
    assert not cert["certified"]
    exact = dict(part, exact=100, early=0)
    assert certify([exact], 0.01)["interval"] == pytest.approx([1.0, 1.0])


def _held(constraint=0.01, **kw):
    cfg = TuningConfig(constraint=constraint, window_rows=100_000, window_output_rows=2000, guard_alpha=0.05,
                           feedback_min=0.02, feedback_max=0.2, max_pending_rows=100_000, **kw)
    ctl = ThresholdController(COSTS, cfg)
    cal_rows = _sample(calibration_rows(constraint), seed=5)
    tune, test = split_rows(len(cal_rows))
    cal = certify_thresholds(cal_rows.take(tune), cal_rows.take(test), COSTS, constraint)
    ctl.calibrate(cal.thresholds)
    return ctl, cal.thresholds


def _confidently_wrong(w: FeedbackWindow, share: float, seed: int) -> FeedbackWindow:
    """A domain where the ramps stay as confident but err on `share` of the rows (what hurt on unseen domains)."""
    flip = np.random.default_rng(seed).uniform(size=len(w)) < share
    pred = np.where(flip[:, None], 1 - w.final[:, None], w.pred)
    return FeedbackWindow(w.conf, pred, w.final)


def test_a_sudden_drift_is_caught_within_one_window_of_output_rows():
    """A calibrated controller fed 10% of each 2,000-row window: a drift to rows where the ramps are confidently
    wrong on 20% of rows (~4% disagreement at the certified thresholds) is backed off in the first drifted
    window, for every seed tried."""
    for seed in range(8):
        ctl, base = _held()
        for k in range(3):  # in-domain windows: held
            ctl.report(_sample(200, seed=1000 * seed + k), output_rows=2000)
        assert np.array_equal(ctl.get_state()["thresholds"], base)
        drifted = _confidently_wrong(_sample(200, seed=1000 * seed + 50), 0.2, seed)
        assert 1 - evaluate(drifted, COSTS, base).agreement > 0.02
        ctl.report(drifted, output_rows=2000)
        h = ctl.history()[-1]
        assert h["action"] == "backoff", (seed, h)
        assert np.all(np.array(ctl.get_state()["thresholds"]) >= base)
        assert ctl.get_state()["feedback_fraction"] == 0.2  # more evidence while the back-off holds


def test_stationary_windows_hold_the_certified_thresholds_at_the_minimum_feedback():
    """Certified thresholds come with the calibration's evidence: the guard watches them at feedback_min (they sit
    near the budget, so the served rate's upper bound would keep feedback_max for thousands of rows)."""
    ctl, base = _held()
    assert ctl.get_state()["feedback_fraction"] == 0.02
    actions = []
    for k in range(12):
        ctl.report(_sample(200, seed=k), output_rows=2000)
        actions.append(ctl.history()[-1]["action"])
        held = np.array_equal(ctl.get_state()["thresholds"], base)
        assert ctl.get_state()["feedback_fraction"] == (0.02 if held else 0.2), (k, actions)
    assert actions.count("backoff") <= 1  # a test at alpha 0.05 per window: a rare false alarm, lifted later
    assert ctl.get_state()["calibrated"]
    assert ctl.get_state()["feedback_fraction"] == 0.02
    assert ctl.get_state()["windows"] == 12


def test_windows_close_on_output_rows_however_sparse_the_feedback():
    ctl, _ = _held()
    ctl.report(_sample(30, seed=1), output_rows=1500)
    assert ctl.get_state()["windows"] == 0
    ctl.report({**_sample(30, seed=2).to_dict(), "output_rows": 600})  # as the client sends it
    assert ctl.get_state()["windows"] == 1 and ctl.history()[-1]["rows"] == 60


def test_a_restarted_controller_keeps_holding_its_certified_thresholds(tmp_path):
    url = str(tmp_path / "ckpt.json")
    cfg = TuningConfig(window_output_rows=500, guard_alpha=0.05)
    ctl = ThresholdController(COSTS, cfg, checkpoint_url=url)
    base = np.array([CLOSED, CLOSED, 0.9, 0.8, 0.7])
    ctl.calibrate(base)
    again = ThresholdController(COSTS, cfg, checkpoint_url=url)
    assert again.get_state()["calibrated"] and np.array_equal(again.get_state()["thresholds"], base)
    again.report(FeedbackWindow.concat([_sample(100, seed=9)]), output_rows=600)
    assert np.all(np.array(again.get_state()["thresholds"]) >= base)


def test_the_cost_line_names_each_share_of_the_actors_time_it_has():
    cost = {"calibration_actor_seconds": 19.8, "calibration_share_of_actor_time": 0.265,
            "calibration_decided_after_seconds": 12.0, "rows_answered_in_full_before_the_decision": 512,
            "before_decision_share_of_actor_time": 0.08, "reference_share_of_actor_time": 0.04,
            "bulk_reference_share_of_actor_time": 0.01,
            "feedback_share_of_bulk_layer_work": 0.097, "feedback_share_of_actor_time_estimated": 0.071}
    line = describe_cost({"cost": cost})
    assert line == ("the promise cost: calibration 26% of the actors' time (19.8 s, decided 12.0 s into the job); "
                    "512 rows answered in full before it (8%); the float original beside it 4% (1% on the bulk's "
                    "audit and feedback rows, the rest in calibration); audit and feedback rows run to the end ~7% "
                    "(their 10% of the bulk's layer work)")
    bare = dict(cost, calibration_actor_seconds=0.0, rows_answered_in_full_before_the_decision=0,
                reference_share_of_actor_time=0.0)
    assert describe_cost({"cost": bare}).startswith("the promise cost: audit and feedback rows")
    assert describe_cost({}) is None


def _compressed(original: FeedbackWindow, head_error: float, seed: int) -> FeedbackWindow:
    """A compressed model's view of the same rows: its head (and ramps that copied it) flipped on `head_error`."""
    rng = np.random.default_rng(seed)
    flip = rng.uniform(size=len(original)) < head_error
    final = np.where(flip, 1 - original.final, original.final)
    pred = np.where(flip[:, None], 1 - original.pred, original.pred)
    return FeedbackWindow(original.conf, pred, final, reference=original.final)


@pytest.mark.parametrize("head_error,speed,winner", [(0.001, 0.5, "model"), (0.03, 0.5, "original"),
                                                     (0.001, 1.5, "original")])
def test_the_model_that_answers_the_bulk_is_chosen_on_the_tune_split(head_error, speed, winner):
    """A compressed model competes with the float original: it wins when its own head leaves the budget room
    and it is quicker; its certified thresholds then hold against the original's answers."""
    from pipeline.control.calibration import Candidate, calibrate_candidates

    original = synthetic_window(1500, SKILLS, seed=3)
    model = _compressed(original, head_error, seed=4)
    chosen, cal, est = calibrate_candidates([Candidate("model", model, None, COSTS, speed),
                                             Candidate("original", original, None, COSTS, 1.0)], 0.01, 0.05, seed=0)
    assert chosen.name == winner and [e["candidate"] for e in est] == ["model", "original"]
    assert est[0]["feasible"] == (head_error < 0.005) and est[1]["head_disagreement"] == 0
    _, test = split_rows(1500, 0)
    if cal.chosen >= 0:  # the certified set's disagreement on the test split counts the model's own head too
        out = evaluate(chosen.sample.take(test), COSTS, cal.thresholds, np.ones(5, bool))
        assert 1 - out.agreement <= cal.upper_bound + 1e-9


def test_a_topped_up_certificate_is_exact_in_whole_rows():
    """The case that once broke the promise: 523 of 593 early rows topped up, none disagreeing, one disagreement
    among the 70 left. A rate times 70 rows claimed under one row; a count must allow it."""
    part = {"shard": 0, "rows": 900, "answered": 900, "calibration": 300, "exact": 830, "early": 70,
            "audit": 523, "audit_disagree": 0, "audit_early": 523, "audit_early_disagree": 0}
    lo, hi = certify([part], 0.01, 0.95, audit_in_early=False)["interval"]
    assert lo <= 1 - 1 / 900 and hi == 1.0
    assert lo > 1 - 2 / 900  # two left over would have shown in the sample at 95%


def test_the_topped_up_interval_covers_every_count_of_disagreements_at_the_stated_rate():
    rng = np.random.default_rng(5)
    answered, drawn_from, n = 900, 593, 523
    for wrong in (1, 3, 10):
        covered = 0
        for _ in range(400):
            bad = np.zeros(drawn_from, bool)
            bad[rng.choice(drawn_from, wrong, replace=False)] = True
            pick = np.zeros(drawn_from, bool)
            pick[rng.choice(drawn_from, n, replace=False)] = True
            truth = 1 - int((bad & ~pick).sum()) / answered  # the sampled rows are the original's answers now
            part = {"shard": 0, "rows": answered, "answered": answered, "calibration": 0,
                    "exact": answered - (drawn_from - n), "early": drawn_from - n, "audit": n, "audit_disagree": 0,
                    "audit_early": n, "audit_early_disagree": int((bad & pick).sum())}
            lo, hi = certify([part], 0.01, 0.95, audit_in_early=False)["interval"]
            covered += lo - 1e-12 <= truth <= hi + 1e-12
        assert covered / 400 >= 0.93, (wrong, covered)


def test_the_count_interval_matches_a_brute_force_hypergeometric():
    from math import comb

    from pipeline.control.stats import hypergeom_count_interval
    M, n = 40, 12
    for k in (0, 1, 4):
        def cdf(x, m):
            return sum(comb(m, i) * comb(M - m, n - i) for i in range(0, x + 1)) / comb(M, n)
        inside = [m for m in range(M + 1) if k <= m <= M - (n - k)
                  and cdf(k, m) > 0.025 and 1 - cdf(k - 1, m) > 0.025]
        assert hypergeom_count_interval(k, n, M, 0.95) == (inside[0], inside[-1])


def test_the_union_bound_certificate_covers_the_truth_when_the_audit_compares_with_the_own_head():
    """A bf16 / int8 model audited against its own head: an answer differs from the original's where exactly
    one of (exit != own head, own head != original) holds (two labels). The audit sees the first, the calibration
    sample the second; their union-bound interval must still hold the true agreement."""
    rng = np.random.default_rng(6)
    answered, m = 3000, 300
    for head_rate, exit_rate in ((0.002, 0.01), (0.01, 0.004)):
        covered = 0
        for _ in range(300):
            head_wrong = rng.random(answered) < head_rate
            exit_wrong = rng.random(answered) < exit_rate
            sample = np.zeros(answered, bool)
            sample[rng.choice(answered, m, replace=False)] = True  # answered by the original: exact
            bulk = ~sample
            truth = 1 - int(((head_wrong ^ exit_wrong) & bulk).sum()) / answered
            audit = bulk & (rng.random(answered) < 0.2)
            at_ramp = bulk & ((rng.random(answered) < 0.6) | exit_wrong)  # only a ramp differs from its head
            part = {"shard": 0, "rows": answered, "answered": answered, "calibration": m, "exact": m,
                    "early": int(bulk.sum()), "audit": int(audit.sum()), "audit_disagree": int((exit_wrong & audit).sum()),
                    "audit_early": int(audit.sum()), "audit_early_disagree": int((exit_wrong & audit).sum()),
                    "ramp": int(at_ramp.sum()), "audit_ramp": int((audit & at_ramp).sum()),
                    "audit_ramp_disagree": int((exit_wrong & audit).sum())}
            head = {"rows": m, "disagreements": int((head_wrong & sample).sum())}
            cert = certify([part], 0.02, 0.95, head=head)
            lo, hi = cert["interval"]
            covered += lo - 1e-12 <= truth <= hi + 1e-12
            assert lo <= cert["agreement"] <= hi and cert["audit_against"] == "own head"
            # a part's interval: the job's head bound may all lie in it, so it is never narrower than the job's
            other = dict(part, shard=1)
            halves = certify([part, other], 0.02, 0.95, head=head)["parts"]
            assert all(p["interval"][0] <= lo + 1e-12 for p in halves)
        assert covered / 300 >= 0.95, (head_rate, exit_rate, covered)


@pytest.mark.parametrize("head_share,winner", [(0.002, "own head"), (0.02, "model")])
def test_a_model_audited_against_its_own_head_is_certified_at_what_its_head_leaves(head_share, winner):
    """The third candidate: the compressed model alone, its exits against its own head at the budget less its
    head's bound. It wins when that leaves room; with no room left it is passed over."""
    from pipeline.control.calibration import Candidate, calibrate_candidates

    original = synthetic_window(1500, SKILLS, seed=3)
    model = _compressed(original, 0.002, seed=4)
    own = FeedbackWindow(model.conf, model.pred, model.final)
    chosen, cal, est = calibrate_candidates([Candidate("model", model, None, COSTS, 0.5, overhead=0.3),
                                             Candidate("original", original, None, COSTS, 1.0),
                                             Candidate("own head", own, None, COSTS, 0.5, head_share=head_share)],
                                            0.01, 0.05, seed=0)
    assert chosen.name == winner and est[2]["budget"] == pytest.approx(0.01 - head_share)
    assert est[2]["feasible"] == (head_share < 0.01)
    if winner == "own head":  # certified against its own head at what is left of the budget
        _, test = split_rows(1500, 0)
        out = evaluate(own.take(test), COSTS, cal.thresholds, np.ones(5, bool))
        assert cal.constraint == pytest.approx(0.01 - head_share) and 1 - out.agreement <= cal.upper_bound + 1e-9

