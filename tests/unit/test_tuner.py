"""Threshold tuner: exit-rule cost math, Apparate's greedy search, the static baseline."""

import numpy as np
import pytest

from pipeline.control.synthetic import synthetic_window
from pipeline.control.tuner import evaluate, evaluate_stretches, exit_costs, static_threshold_search, tune_thresholds
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow


def _window(conf, pred, final) -> FeedbackWindow:
    return FeedbackWindow(np.asarray(conf, np.float32), np.asarray(pred), np.asarray(final))


def _costs(num_ramps: int, ramp_cost: float = 0.01) -> CostModel:
    # A ramp after every layer but the last.
    return CostModel.uniform(num_ramps + 1, range(1, num_ramps + 1), ramp_cost)


def _random_case(seed: int):
    rng = np.random.default_rng(seed)
    R = int(rng.integers(1, 9))
    L = R + int(rng.integers(1, 4))
    layers = np.sort(rng.choice(np.arange(1, L), size=R, replace=False))
    costs = CostModel(rng.uniform(0.5, 2.0, L), layers, rng.uniform(0.0, 0.05, R))
    skills = np.sort(rng.uniform(0.2, 1.1, R))
    w = synthetic_window(int(rng.integers(50, 2500)), skills, num_classes=int(rng.integers(2, 7)), seed=seed)
    return w, costs, rng


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_hand_computed():
    # L=4 layers costing 1,2,3,4 (full cost 10); ramps after layers 1,2,3 costing .1,.2,.3; ramp 1 off.
    costs = CostModel([1, 2, 3, 4], [1, 2, 3], [0.1, 0.2, 0.3])
    w = _window(
        conf=[[0.90, 0.10, 0.10],  # exits at ramp 0, right
              [0.50, 0.95, 0.20],  # ramp 1 would exit but is inactive; runs to the end
              [0.50, 0.50, 0.99],  # exits at ramp 2, right
              [0.85, 0.00, 0.00]],  # exits at ramp 0, wrong
        pred=[[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]],
        final=[1, 1, 1, 1],
    )
    out = evaluate(w, costs, [0.8, 0.5, 0.9], [True, False, True])
    # row costs: 1+.1 | 10+.1+.3 | 1+2+3+.1+.3 | 1+.1  -> mean 19/4
    assert out.exit_ramp.tolist() == [0, -1, 2, 0]
    assert out.exit_counts.tolist() == [2, 0, 1]
    assert out.agreement == pytest.approx(0.75)
    assert out.savings == pytest.approx(1 - 4.75 / 10)
    assert out.layer_savings == pytest.approx(1 - (1 + 4 + 3 + 1) / 4 / 4)


def test_closed_means_exactly_one_and_conf_one_exits_below_it():
    costs = CostModel([1, 1], [1], [0.0])
    w = _window([[1.0], [0.5]], [[0], [0]], [0, 0])
    assert evaluate(w, costs, [1.0]).exit_counts.tolist() == [0]
    assert evaluate(w, costs, [0.999]).exit_counts.tolist() == [1]
    assert evaluate(w, costs, [0.5]).exit_counts.tolist() == [2]


def test_all_ramps_off_is_the_original_model():
    w = synthetic_window(300, [0.3, 0.6, 0.9], seed=1)
    costs = _costs(3)
    off = evaluate(w, costs, [0.0, 0.0, 0.0], [False, False, False])
    assert off.agreement == 1.0 and off.savings == 0.0 and off.layer_savings == 0.0
    assert off.exit_counts.sum() == 0
    # Active but closed ramps never exit yet still cost their evaluation.
    closed = evaluate(w, costs, [CLOSED] * 3)
    assert closed.agreement == 1.0
    assert closed.savings == pytest.approx(-0.03 / 4)


def test_empty_window():
    costs = _costs(2)
    out = evaluate(FeedbackWindow.empty(2), costs, [0.5, 0.5])
    assert out.agreement == 1.0 and out.savings == 0.0
    res = tune_thresholds(FeedbackWindow.empty(2), costs)
    assert res.thresholds.tolist() == [CLOSED, CLOSED]


def test_window_dict_roundtrip_and_concat():
    w = synthetic_window(10, [0.4, 0.8], seed=3)
    back = FeedbackWindow.from_dict(w.to_dict())
    assert np.array_equal(back.conf, w.conf) and np.array_equal(back.pred, w.pred)
    both = FeedbackWindow.concat([w, back])
    assert len(both) == 20 and both.num_ramps == 2
    assert len(FeedbackWindow.from_dict(FeedbackWindow.empty(2).to_dict())) == 0
    with pytest.raises(ValueError):
        evaluate(w, _costs(3), [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- greedy search
def test_always_right_ramp_opens_fully_and_coin_flip_ramp_stays_shut():
    rng = np.random.default_rng(0)
    N = 2000
    final = rng.integers(0, 2, N)
    coin = rng.integers(0, 2, N)  # ramp 0: a coin flip vs the final answer, confident anyway
    conf = np.stack([rng.uniform(0.6, 1.0, N), rng.uniform(0.55, 1.0, N), rng.uniform(0.5, 1.0, N)], 1)
    pred = np.stack([coin, final, final], 1)  # ramp 1 is always right
    w = _window(conf, pred, final)
    costs = _costs(3)
    res = tune_thresholds(w, costs, constraint=0.01)
    assert 1 - res.agreement <= 0.01 + 1e-12
    # Every row that reaches ramp 1 exits there.
    assert res.thresholds[1] <= w.conf[:, 1].min()
    assert res.exit_counts[0] + res.exit_counts[1] == N
    # The coin-flip ramp takes at most a sliver: each of its exits is wrong half the time.
    assert res.exit_counts[0] <= 0.05 * N
    strict = tune_thresholds(w, costs, constraint=0.0)
    assert strict.agreement == 1.0
    assert strict.exit_counts[1] + strict.exit_counts[0] == N
    assert strict.exit_counts[0] <= 15  # only a lucky run of right answers at the very top


@pytest.mark.parametrize("seed", range(12))
def test_tuned_thresholds_meet_the_constraint_on_their_window(seed):
    w, costs, rng = _random_case(seed)
    R = w.num_ramps
    active = rng.uniform(size=R) < 0.8
    for constraint in (0.0, 0.004, 0.01, 0.03):
        start = rng.uniform(0.3, 1.0, R) if seed % 2 else None
        floor = rng.uniform(0.0, 0.6, R) if seed % 3 == 0 else 0.0
        res = tune_thresholds(w, costs, constraint, active=active, start=start, floor=floor)
        out = evaluate(w, costs, res.thresholds, active)
        assert 1 - out.agreement <= constraint + 1e-12
        assert out.agreement == res.agreement and out.savings == res.savings
        assert np.all(res.thresholds[~active] == CLOSED)
        assert np.all((res.thresholds >= np.broadcast_to(floor, (R,))) | ~active)


def _reference_greedy(w, costs, constraint, active, init_step=0.01, min_step=0.001):
    """The search written the slow, obvious way: full evaluate() per candidate move, no caches."""
    N, R = w.conf.shape
    act = np.asarray(active, bool)
    at_exit, no_exit = exit_costs(costs, act)

    def total(out):  # exact: test costs are small binary fractions
        return float(np.where(out.exit_ramp >= 0, at_exit[np.maximum(out.exit_ramp, 0)], no_exit).sum())

    def wrong(out):
        e = out.exit_ramp
        return int(((e >= 0) & (w.pred[np.arange(N), np.maximum(e, 0)] != w.final)).sum())

    allowed = int(np.floor(constraint * N + 1e-9))
    thr, steps, live = np.full(R, CLOSED), np.full(R, init_step), act.copy()
    cur = evaluate(w, costs, thr, act)
    while True:
        cand = np.flatnonzero(live & (steps >= min_step))
        if cand.size == 0:
            break
        best_key, best, plateau = None, None, False
        for i in cand:
            t_new = max(0.0, round(float(thr[i]) - float(steps[i]), 6))
            if t_new >= thr[i]:
                live[i] = False
                continue
            trial = thr.copy()
            trial[i] = t_new
            out = evaluate(w, costs, trial, act)
            if np.array_equal(out.exit_ramp, cur.exit_ramp):
                thr[i], steps[i], plateau = t_new, steps[i] * 2, True
                live[i] = t_new > 0.0
                continue
            loss, gain = wrong(out) - wrong(cur), total(cur) - total(out)
            if wrong(out) > allowed:
                continue
            key = (1, gain, -loss, -i) if loss <= 0 else (0, gain / loss, gain, -i)
            if best_key is None or key > best_key:
                best_key, best = key, (i, t_new)
        if best is not None:
            i, t_new = best
            thr[i], steps[i] = t_new, steps[i] * 2
            live[i] = t_new > 0.0
            cur = evaluate(w, costs, thr, act)
        elif not plateau:
            steps[cand] /= 2
    for i in np.flatnonzero(act):  # snap
        ex = cur.exit_ramp == i
        thr[i] = max(float(w.conf[ex, i].min()), thr[i]) if ex.any() else CLOSED
    return thr


@pytest.mark.parametrize("seed", range(8))
def test_matches_the_obvious_implementation(seed):
    rng = np.random.default_rng(seed)
    R = int(rng.integers(1, 7))
    costs = CostModel(np.ones(R + 1), np.arange(1, R + 1), np.full(R, 0.25 if seed % 2 else 0.0))
    w = synthetic_window(int(rng.integers(100, 800)), np.sort(rng.uniform(0.2, 1.1, R)), seed=seed)
    active = rng.uniform(size=R) < 0.85
    for constraint in (0.0, 0.01, 0.03):
        fast = tune_thresholds(w, costs, constraint, active=active)
        slow = _reference_greedy(w, costs, constraint, active)
        assert np.array_equal(fast.thresholds, slow), (constraint, fast.thresholds, slow)


def test_tighter_constraint_never_saves_more_single_ramp():
    # With one ramp, disagreement only grows as its threshold falls, so the search is monotone.
    for seed in range(30):
        rng = np.random.default_rng(seed)
        L = int(rng.integers(2, 13))
        costs = CostModel.uniform(L, [int(rng.integers(1, L))], 0.01)
        w = synthetic_window(int(rng.integers(100, 3000)), [rng.uniform(0.2, 1.1)], seed=seed)
        savings = [tune_thresholds(w, costs, c).savings for c in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05)]
        assert np.all(np.diff(savings) >= -1e-12), (seed, savings)


def test_tighter_constraint_never_saves_more_many_ramps():
    w = synthetic_window(3000, np.linspace(0.3, 1.0, 6), seed=7)
    costs = _costs(6)
    cold = [tune_thresholds(w, costs, c).savings for c in (0.0, 0.005, 0.01, 0.02, 0.05)]
    assert np.all(np.diff(cold) >= -1e-12), cold
    # Warm-started from the tighter answer, the looser search can only add savings.
    for seed in range(10):
        w, costs, _ = _random_case(100 + seed)
        start, prev = None, -np.inf
        for c in (0.0, 0.003, 0.01, 0.03):
            res = tune_thresholds(w, costs, c, start=start)
            assert not res.restarted and res.savings >= prev - 1e-12
            start, prev = res.thresholds, res.savings


def test_deterministic_and_independent_of_row_order():
    w = synthetic_window(2000, np.linspace(0.3, 1.0, 8), num_classes=3, seed=5)
    costs = _costs(8)
    a = tune_thresholds(w, costs, 0.01)
    b = tune_thresholds(w, costs, 0.01)
    perm = np.random.default_rng(1).permutation(len(w))
    c = tune_thresholds(FeedbackWindow(w.conf[perm], w.pred[perm], w.final[perm]), costs, 0.01)
    assert np.array_equal(a.thresholds, b.thresholds) and a.rounds == b.rounds
    assert np.array_equal(a.thresholds, c.thresholds)
    assert a.savings == c.savings


def test_crosses_plateaus_and_respects_floor():
    # An always-right ramp whose confidences all sit in [0.30, 0.35]: nothing moves between 1.0 and 0.35.
    rng = np.random.default_rng(2)
    N = 500
    final = rng.integers(0, 4, N)
    conf = rng.uniform(0.30, 0.35, (N, 1)).astype(np.float32)
    w = _window(conf, final[:, None], final)
    costs = CostModel.uniform(2, [1], 0.01)
    res = tune_thresholds(w, costs, 0.0)
    assert res.exit_counts[0] == N
    assert res.thresholds[0] == pytest.approx(float(conf.min()))  # snapped to the lowest exiting conf
    assert res.rounds < 200  # plateau moves double the step; it does not crawl 0.01 at a time
    floored = tune_thresholds(w, costs, 0.0, floor=0.5)
    assert floored.exit_counts[0] == 0 and floored.thresholds[0] == CLOSED


def test_snap_changes_no_exit_and_inactive_ramps_are_ignored():
    w = synthetic_window(1500, [0.5, 0.7, 1.0], seed=11)
    costs = _costs(3)
    raw = tune_thresholds(w, costs, 0.01, snap=False)
    snapped = tune_thresholds(w, costs, 0.01)
    assert np.all(snapped.thresholds >= raw.thresholds)
    assert np.array_equal(
        evaluate(w, costs, raw.thresholds).exit_ramp, evaluate(w, costs, snapped.thresholds).exit_ramp
    )
    only_last = tune_thresholds(w, costs, 0.01, active=[False, False, True])
    assert only_last.thresholds[:2].tolist() == [CLOSED, CLOSED]
    assert only_last.exit_counts[:2].tolist() == [0, 0] and only_last.exit_counts[2] > 0


def test_infeasible_start_restarts_from_closed():
    w = synthetic_window(1000, [0.3, 0.5], seed=4)
    costs = _costs(2)
    res = tune_thresholds(w, costs, 0.01, start=[0.0, 0.0])
    assert res.restarted and 1 - res.agreement <= 0.01 + 1e-12


def test_argument_checks():
    w = synthetic_window(10, [0.5], seed=0)
    costs = _costs(1)
    with pytest.raises(ValueError):
        tune_thresholds(w, costs, constraint=1.5)
    with pytest.raises(ValueError):
        tune_thresholds(w, costs, init_step=0.001, min_step=0.01)
    with pytest.raises(ValueError):
        CostModel([1, 1], [2, 1], [0, 0])  # ramp layers must increase


# ----------------------------------------------------------------------------- static baseline
def test_static_threshold_search_picks_lowest_feasible_grid_value():
    w = synthetic_window(2000, np.linspace(0.3, 1.0, 5), seed=9)
    costs = _costs(5)
    grid = np.round(np.arange(0.5, 1.0, 0.01), 2)
    res = static_threshold_search(w, costs, 0.01, grid)
    g = res.thresholds[0]
    assert np.all(res.thresholds == g)
    assert 1 - res.agreement <= 0.01 + 1e-12
    lower = grid[grid < g]
    for x in lower:  # brute force: every lower grid value breaks the constraint
        assert 1 - evaluate(w, costs, np.full(5, x)).agreement > 0.01
    greedy = tune_thresholds(w, costs, 0.01)
    assert greedy.savings >= res.savings  # per-ramp thresholds beat one shared threshold here
    none = static_threshold_search(w, costs, 0.0, [0.5])
    assert none.thresholds.tolist() == [CLOSED] * 5 or 1 - none.agreement == 0.0


def test_many_ramps_keep_the_constraint_and_beat_one_shared_threshold():
    """12 ramps x 4096 rows (its speed is in `offramp replay`'s tuner timings, not in a test)."""
    w = synthetic_window(4096, np.linspace(0.3, 1.1, 12), seed=1)
    costs = _costs(12)
    res = tune_thresholds(w, costs, 0.01)
    static = static_threshold_search(w, costs, 0.01)
    assert 1 - res.agreement <= 0.01 + 1e-12
    assert res.savings > static.savings > 0


# ----------------------------------------------------------------------------- a reference other than the final head
def _with_reference(w: FeedbackWindow, flip: np.ndarray) -> FeedbackWindow:
    """`w` whose final head disagrees with the reference answers on the rows in `flip` (a compressed model)."""
    final = w.final.copy()
    final[flip] = (final[flip] + 1) % 2
    return FeedbackWindow(w.conf, w.pred, final, reference=w.final)


def test_reference_counts_rows_that_run_to_the_end():
    w = _window([[0.9], [0.9], [0.2], [0.2]], [[1], [0], [0], [1]], [1, 1, 0, 1])
    ref = FeedbackWindow(w.conf, w.pred, np.array([1, 1, 1, 1]), reference=np.array([1, 0, 0, 0]))
    costs = _costs(1)
    closed = evaluate(ref, costs, [CLOSED])
    assert closed.agreement == 0.25  # rows 1-3: the final head disagrees with the reference
    opened = evaluate(ref, costs, [0.5])  # rows 0, 1 exit with the reference's answers
    assert opened.agreement == 0.5
    assert np.array_equal(ref.final_ok, [True, False, False, False])
    back = FeedbackWindow.from_dict(ref.to_dict())
    assert np.array_equal(back.reference, ref.reference) and np.array_equal(back.labels, ref.reference)
    both = FeedbackWindow.concat([w, ref])  # a window without reference contributes its finals
    assert np.array_equal(both.labels, [1, 1, 0, 1, 1, 0, 0, 0])
    assert np.array_equal(ref.slice(1, 3).reference, [0, 0])
    with pytest.raises(ValueError, match="reference"):
        FeedbackWindow(w.conf, w.pred, w.final, reference=np.zeros(3))


@pytest.mark.parametrize("seed", range(5))
def test_reference_tuning_meets_the_constraint_and_never_worsens_an_infeasible_start(seed):
    w = synthetic_window(1500, [0.5, 0.8, 1.0], num_classes=2, seed=seed)
    costs = _costs(3)
    rng = np.random.default_rng(seed)
    few = _with_reference(w, rng.choice(len(w), 5, replace=False))  # 0.33% lost by the final head
    res = tune_thresholds(few, costs, 0.01)
    assert 1 - res.agreement <= 0.01 + 1e-12
    assert res.agreement == evaluate(few, costs, res.thresholds).agreement
    assert res.savings > 0
    # A tighter budget than the final head already spends: only moves that do not lose agreement.
    many = _with_reference(w, rng.choice(len(w), 30, replace=False))  # 2% lost
    closed = evaluate(many, costs, [CLOSED] * 3).agreement
    res = tune_thresholds(many, costs, 0.01)
    assert res.agreement >= closed


def test_ignoring_the_reference_overspends_the_budget():
    """Tuning against the compressed final head alone spends the whole budget on top of its own loss."""
    w = synthetic_window(2000, [0.6, 0.9], num_classes=2, seed=7)
    costs = _costs(2)
    ref = _with_reference(w, np.arange(0, 2000, 200))  # final head loses 0.5%
    naive = tune_thresholds(FeedbackWindow(ref.conf, ref.pred, ref.final), costs, 0.01)
    aware = tune_thresholds(ref, costs, 0.01)
    assert 1 - evaluate(ref, costs, aware.thresholds).agreement <= 0.01 + 1e-12
    assert evaluate(ref, costs, naive.thresholds).agreement < evaluate(ref, costs, aware.thresholds).agreement


def test_evaluate_stretches_weights_each_stretch_by_its_rows():
    w = synthetic_window(300, [0.4, 0.6, 0.8], seed=5)
    costs = _costs(3)
    lo, hi = np.array([0.6, 0.7, 0.8]), np.array([0.95, 0.97, 0.99])
    act = np.ones(3, bool)
    one = evaluate(w, costs, lo, act)
    assert evaluate_stretches(w, costs, [(300, lo, act)]) == pytest.approx(
        {"agreement": one.agreement, "savings": one.savings, "layer_savings": one.layer_savings,
         "exit_rate": one.exit_rate})
    a, b = evaluate(w.slice(0, 100), costs, lo, act), evaluate(w.slice(100), costs, hi, act)
    got = evaluate_stretches(w, costs, [(100, lo, act), (300, hi, act)])
    assert got["agreement"] == pytest.approx((100 * a.agreement + 200 * b.agreement) / 300)
    assert got["savings"] == pytest.approx((100 * a.savings + 200 * b.savings) / 300)
