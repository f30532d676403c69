"""Ramp adjustment: utilities, the drop rule, adding candidates, and the ramp budget."""
import numpy as np
import pytest

from pipeline.control.ramp_adjust import (
    RampBudget,
    adjust_ramps,
    candidate_gains,
    ramp_utilities,
    tail_overhead,
)
from pipeline.control.synthetic import synthetic_window
from pipeline.control.tuner import tune_thresholds
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow


def test_utility_hand_computed():
    # 4 layers of cost 1; ramps after layers 1 and 2 costing 0.2 and 0.1.
    costs = CostModel([1, 1, 1, 1], [1, 2], [0.2, 0.1])
    conf = np.array([[0.9, 0.0], [0.1, 0.9], [0.1, 0.1], [0.1, 0.1]], np.float32)
    w = FeedbackWindow(conf, np.zeros((4, 2), np.int64), np.zeros(4, np.int64))
    u = ramp_utilities(w, costs, [0.5, 0.5], [True, True])
    # ramp 0: exits 1/4, saves (4 + .3) - (1 + .2) = 3.1; 3/4 pass it, paying .2
    # ramp 1: exits 1/4, saves (4 + .3) - (2 + .3) = 2.0; 2/4 pass it, paying .1
    assert u[0] == pytest.approx((0.25 * 3.1 - 0.75 * 0.2) / 4)
    assert u[1] == pytest.approx((0.25 * 2.0 - 0.5 * 0.1) / 4)
    u_off = ramp_utilities(w, costs, [0.5, 0.5], [True, False])
    assert np.isnan(u_off[1])
    # A closed ramp never exits: its utility is just its cost for every row, negative.
    u_closed = ramp_utilities(w, costs, [CLOSED, 0.5], [True, True])
    assert u_closed[0] == pytest.approx(-0.2 / 4)
    # ... unless judged by what it would save if opened; a ramp that was open keeps its realized utility.
    u_would = ramp_utilities(w, costs, [CLOSED, 0.5], [True, True], if_opened=[0.5, 0.5])
    assert u_would[0] == pytest.approx(u[0]) and u_would[1] == pytest.approx(u_closed[1])
    still_shut = ramp_utilities(w, costs, [CLOSED, 0.5], [True, True], if_opened=[CLOSED, 0.9])
    assert still_shut[0] == pytest.approx(-0.2 / 4) and still_shut[1] == pytest.approx(u_closed[1])


def test_ramp_costing_more_than_it_saves_is_dropped():
    # Ramp 0 is expensive (half a layer) and rarely confident; ramp 1 is cheap and useful.
    costs = CostModel(np.ones(4), [1, 2], [0.5, 0.01])
    history = []
    for seed in range(10):
        w = synthetic_window(600, [0.15, 0.9], seed=seed)
        res = tune_thresholds(w, costs, 0.01)
        history.append(ramp_utilities(w, costs, res.thresholds, [True, True]))
    h = np.array(history)
    assert (h[:, 0] < 0).mean() > 0.6 and (h[:, 1] > 0).all()
    d = adjust_ramps(history, [True, True], costs, RampBudget(max_active=2, max_tail_overhead=1.0))
    assert d.active.tolist() == [False, True]
    assert d.dropped == [0] and d.added == [] and d.changed


def test_drop_rule_is_strictly_more_than_the_share():
    costs = CostModel.uniform(3, [1, 2], 0.0)
    budget = RampBudget(max_active=2, max_tail_overhead=1.0)
    six_of_ten = [np.array([-1.0, 1.0])] * 6 + [np.array([1.0, 1.0])] * 4
    assert adjust_ramps(six_of_ten, [True, True], costs, budget).active.tolist() == [True, True]
    seven_of_ten = [np.array([-1.0, 1.0])] * 7 + [np.array([1.0, 1.0])] * 3
    assert adjust_ramps(seven_of_ten, [True, True], costs, budget).active.tolist() == [False, True]
    # No evidence yet (NaN = was inactive): never dropped for it.
    fresh = [np.array([np.nan, 1.0])] * 5
    assert adjust_ramps(fresh, [True, True], costs, budget).active.tolist() == [True, True]


def test_budget_on_count_keeps_the_highest_utility_ramps():
    costs = CostModel.uniform(5, [1, 2, 3, 4], 0.001)
    history = [np.array([0.01, 0.05, 0.03, 0.02])] * 5
    d = adjust_ramps(history, [True] * 4, costs, RampBudget(max_active=2))
    assert d.active.tolist() == [False, True, True, False]
    assert sorted(d.dropped) == [0, 3]
    assert RampBudget(2).fits(costs, d.active)


def test_budget_on_tail_overhead():
    # full cost 10; ramps cost 2%, 3%, 4% of it; budget 5% -> best-first fill skips what does not fit.
    costs = CostModel(np.full(10, 1.0), [2, 4, 6], [0.2, 0.3, 0.4])
    assert tail_overhead(costs, [True, True, True]) == pytest.approx(0.09)
    history = [np.array([0.02, 0.05, 0.04])] * 3
    d = adjust_ramps(history, [True, True, True], costs, RampBudget(max_active=3, max_tail_overhead=0.05))
    # ramp 1 (3%) first, ramp 2 (4%) would make 7%: skipped, ramp 0 (2%) fits: 5%.
    assert d.active.tolist() == [True, True, False]
    assert tail_overhead(costs, d.active) <= 0.05 + 1e-12


def test_useful_inactive_ramp_is_added_within_budget():
    costs = CostModel.uniform(5, [1, 2, 3, 4], 0.01)
    w = synthetic_window(2000, [0.3, 0.95, 0.6, 1.0], seed=3)
    active = np.array([True, False, False, True])
    gains = candidate_gains(w, costs, active, constraint=0.01)
    assert np.isnan(gains[0]) and np.isnan(gains[3])
    assert gains[1] > 0 and gains[1] > gains[2]  # the strong early ramp is the one worth adding
    history = [ramp_utilities(w, costs, tune_thresholds(w, costs, 0.01, active).thresholds, active)]
    d = adjust_ramps(history, active, costs, RampBudget(max_active=4), candidate_gain=gains)
    assert d.added == [1] and d.active[1]
    # With room for only two ramps the newcomer must out-score an incumbent to stay.
    tight = adjust_ramps(history, active, costs, RampBudget(max_active=2), candidate_gain=gains)
    assert tight.active.sum() == 2
    assert RampBudget(max_active=2).fits(costs, tight.active)


def test_budget_checks():
    with pytest.raises(ValueError):
        RampBudget(max_active=-1)
    with pytest.raises(ValueError):
        RampBudget(max_active=1, max_tail_overhead=-0.1)
    costs = CostModel.uniform(3, [1, 2], 0.0)
    with pytest.raises(ValueError):
        adjust_ramps([np.zeros(2)], [True, True, True], costs, RampBudget(2))


def test_a_controller_starting_closed_keeps_useful_ramps_at_its_first_check():
    # Every ramp starts closed (ControllerState.initial): served closed, each one costs without saving, so
    # its realized utility is negative. Judged that way the first check (at once: 5 active break max_active=3)
    # dropped every ramp; judged by what it saves once tuned, the three best stay and open.
    from pipeline.config import TuningConfig
    from pipeline.control.controller import ThresholdController

    costs = CostModel.uniform(6, [1, 2, 3, 4, 5], 0.004)
    ctl = ThresholdController(costs, TuningConfig(window_rows=512, max_active=3))
    assert set(ctl.get_state()["thresholds"]) == {CLOSED}
    ctl.report(synthetic_window(512, [0.45, 0.55, 0.65, 0.8, 0.9], seed=0))
    st, check = ctl.get_state(), ctl.history()[-1]["ramp_check"]
    assert check is not None and st["ramp_changes"] == 1
    assert sum(st["active"]) == 3 and len(check["dropped"]) == 2
    assert any(t < CLOSED for t in st["thresholds"])
    assert ctl.history()[-1]["tuned_savings"] > 0
    # A ramp the tuner keeps shut is still judged a cost: a coin-flip ramp is what gets dropped.
    coin = CostModel.uniform(3, [1, 2], 0.05)
    ctl = ThresholdController(coin, TuningConfig(window_rows=512, max_active=1, ramp_check_windows=1))
    ctl.report(synthetic_window(512, [-5.0, 0.9], seed=1))
    assert ctl.get_state()["active"] == [False, True]
