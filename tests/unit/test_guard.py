"""Accuracy guard (state machine and back-off), and the controller's guard loop without Ray."""
import json

import numpy as np
import pytest

from pipeline.config import TuningConfig
from pipeline.control.controller import ThresholdController
from pipeline.control.guard import AccuracyGuard, GuardAction, back_off, is_violation, violating_ramps
from pipeline.control.state import ControllerState
from pipeline.control.synthetic import synthetic_window
from pipeline.control.tuner import evaluate
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow


# ----------------------------------------------------------------------------- state machine
def test_violation_retunes_then_repeated_violations_back_off():
    g = AccuracyGuard(constraint=0.01, backoff_after=2)
    assert g.observe(0.995) is GuardAction.OK
    assert g.observe(0.98) is GuardAction.RETUNE
    assert g.observe(0.97) is GuardAction.BACKOFF
    assert g.observe(0.97) is GuardAction.BACKOFF  # still violating: keep backing off
    assert g.observe(0.999) is GuardAction.OK and g.consecutive == 0
    assert g.observe(0.98) is GuardAction.RETUNE  # the count starts over after a good window
    assert AccuracyGuard.from_dict(json.loads(json.dumps(g.to_dict()))).consecutive == 1


def test_exactly_at_the_constraint_is_not_a_violation():
    assert not is_violation(0.99, 0.01)  # 1 - 0.99 is 0.010000000000000009 in floats
    assert is_violation(0.9899, 0.01)
    with pytest.raises(ValueError):
        AccuracyGuard(constraint=0.01, backoff_after=0)


def test_back_off_raises_only_the_offending_thresholds():
    thr = np.array([0.9, 0.8, CLOSED, 0.5])
    out = back_off(thr, [True, False, True, True])
    assert out == pytest.approx([0.99, 0.8, CLOSED, 0.95])
    assert back_off(out, [True, False, False, False])[0] == pytest.approx(0.999)  # x0.1 again
    assert back_off(thr, [False, True, False, False], close=True).tolist() == [0.9, CLOSED, CLOSED, 0.5]
    assert thr.tolist() == [0.9, 0.8, CLOSED, 0.5]  # input untouched


def test_violating_ramps_names_the_ramp_with_wrong_exits():
    rng = np.random.default_rng(0)
    N = 1000
    final = rng.integers(0, 2, N)
    conf = rng.uniform(0.6, 1.0, (N, 3)).astype(np.float32)
    pred = np.stack([final, final, final], 1)
    flip = rng.uniform(size=N) < 0.2
    pred[flip, 1] = 1 - final[flip]  # ramp 1 is wrong on 20% of rows
    w = FeedbackWindow(conf, pred, final)
    costs = CostModel.uniform(4, [1, 2, 3], 0.01)
    thr = np.array([0.9, 0.7, 0.7])
    bad = violating_ramps(w, costs, thr, None, 0.01)
    assert bad.tolist() == [False, True, False]


def test_violating_ramps_judge_against_the_reference_not_the_compressed_head():
    """A compressed model's ramp that copies its own head is wrong wherever that head differs from the float
    original (the reference)."""
    rng = np.random.default_rng(1)
    N = 1000
    reference = rng.integers(0, 2, N)
    final = reference.copy()
    final[rng.uniform(size=N) < 0.1] ^= 1  # the compressed head disagrees with the original on ~10%
    conf = rng.uniform(0.6, 1.0, (N, 2)).astype(np.float32)
    pred = np.stack([reference, final], 1)  # ramp 0 follows the original, ramp 1 the compressed head
    costs = CostModel.uniform(3, [1, 2], 0.01)
    thr = np.array([0.8, 0.6])
    # judged against the compressed head, the ramp that is right takes the blame
    assert violating_ramps(FeedbackWindow(conf, pred, final), costs, thr, None, 0.01).tolist() == [True, False]
    with_ref = FeedbackWindow(conf, pred, final, reference=reference)
    assert violating_ramps(with_ref, costs, thr, None, 0.01).tolist() == [False, True]


# ----------------------------------------------------------------------------- controller loop
def _stream(rows, seed, ramp0_right=True):
    """Two ramps; ramp 1 always right; ramp 0 right (or a coin flip), confident either way."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, rows)
    p0 = final if ramp0_right else rng.integers(0, 2, rows)
    conf = np.stack([rng.uniform(0.6, 1.0, rows), rng.uniform(0.6, 1.0, rows)], 1)
    return FeedbackWindow(conf.astype(np.float32), np.stack([p0, final], 1), final)


def test_controller_retunes_on_violation_and_backs_off_the_bad_ramp():
    costs = CostModel.uniform(3, [1, 2], 0.01)
    # Apparate's rule (re-tune on the first violation, back off on the second; the default backs off at once),
    # tuned on the whole buffer only (the default also tunes on the newest windows, which alone recover here).
    cfg = TuningConfig(window_rows=200, adjust_ramps=False, backoff_after=2, recent_windows=0)
    ctl = ThresholdController(costs, cfg)
    for k in range(4):
        ctl.report(_stream(200, k))
    opened = np.array(ctl.get_state()["thresholds"])
    assert opened[0] < 0.7  # ramp 0 was always right: open wide
    v_before = ctl.get_state()["version"]
    for k in range(4, 8):  # drift: ramp 0 becomes a confident coin flip
        ctl.report(_stream(200, k, ramp0_right=False))
    h = ctl.history()
    actions = [x["action"] for x in h[4:]]
    assert actions[0] == "retune"
    assert "backoff" in actions
    first_backoff = next(x for x in h if x["action"] == "backoff")
    assert first_backoff["backed_off"] == [0]
    prev = h[h.index(first_backoff) - 1]["thresholds"][0]
    assert first_backoff["thresholds"][0] >= 1 - (1 - prev) * 0.1 - 1e-12  # cut before re-tuning
    st = ctl.get_state()
    assert st["violations"] >= 2 and st["backoffs"] >= 1 and st["version"] > v_before
    # Recovery: the controller stops violating once ramp 0 is throttled.
    for k in range(8, 14):
        ctl.report(_stream(200, k, ramp0_right=False))
    assert ctl.history()[-1]["action"] == "ok"
    assert 1 - ctl.history()[-1]["agreement"] <= 0.01 + 1e-12


def test_default_controller_backs_off_on_the_first_violation():
    costs = CostModel.uniform(3, [1, 2], 0.01)
    cfg = TuningConfig(window_rows=200, adjust_ramps=False)
    assert cfg.backoff_after == 1 and cfg.tune_headroom == 0.3
    ctl = ThresholdController(costs, cfg)
    for k in range(4):
        ctl.report(_stream(200, k))
    ctl.report(_stream(200, 4, ramp0_right=False))  # ramp 0 turns into a confident coin flip
    last = ctl.history()[-1]
    assert last["action"] == "backoff" and last["backed_off"] == [0]
    assert ctl.get_state()["backoffs"] == 1


def test_early_guard_backs_off_within_a_window_and_counts_the_rows_before_it_as_served():
    costs = CostModel.uniform(3, [1, 2], 0.01)
    ctl = ThresholdController(costs, TuningConfig(window_rows=400, adjust_ramps=False, recent_windows=0))
    for k in range(4):
        ctl.report(_stream(400, k))
    thr_before = list(ctl.get_state()["thresholds"])
    assert thr_before[0] < 0.7 and ctl.get_state()["backoffs"] == 0
    opened = [r for r, t in enumerate(thr_before) if t < CLOSED]
    bad = _stream(400, 9, ramp0_right=False)  # ramp 0 turns into a confident coin flip
    ctl.report(bad.slice(0, 50))  # under a quarter window: no early check yet
    assert ctl.get_state()["thresholds"] == thr_before
    ctl.report(bad.slice(50, 100))  # 100 rows, ~half of them wrong: far past the window's 4-row budget
    st, h = ctl.get_state(), ctl.history()[-1]
    # Every open ramp is backed off, not only the one that erred: a few rows cannot tell which will err next.
    assert h["action"] == "early_backoff" and h["backed_off"] == opened and h["window"] == 4
    assert st["backoffs"] == 1 and st["violations"] == 0 and st["thresholds"][0] > thr_before[0]
    for a in range(100, 400, 100):  # later reports in the window may brake again, if their rows break it
        ctl.report(bad.slice(a, a + 100))
    brakes = [x for x in ctl.history() if x["action"] == "early_backoff"]
    end = ctl.history()[-1]
    assert end["action"] != "early_backoff" and end["window"] == 5
    assert [b["rows"] for b in brakes][0] == 100 and all(b["window"] == 4 for b in brakes)
    # Served: each stretch of the window at the thresholds in force while it was served.
    cuts = [0] + [b["rows"] for b in brakes] + [400]
    thrs = [thr_before] + [b["thresholds"] for b in brakes]
    served = sum((hi - lo) * evaluate(bad.slice(lo, hi), costs, t, [True, True]).agreement
                 for lo, hi, t in zip(cuts, cuts[1:], thrs))
    assert end["agreement"] == pytest.approx(served / 400)
    # Easy rows never trigger it; nor does a controller with early_guard off.
    calm = ThresholdController(costs, TuningConfig(window_rows=400, adjust_ramps=False))
    off = ThresholdController(costs, TuningConfig(window_rows=400, adjust_ramps=False, early_guard=False))
    for k in range(4):
        for c in (calm, off):
            c.report(_stream(400, k))
    for a in range(0, 400, 100):
        calm.report(_stream(400, 20).slice(a, a + 100))
        off.report(bad.slice(a, a + 100))
    assert not any(x["action"] == "early_backoff" for c in (calm, off) for x in c.history())


@pytest.mark.parametrize("wrong, brakes", [(0, False), (1, False), (2, True)])
def test_early_guard_forecasts_the_rest_of_the_window_from_the_rows_so_far(wrong, brakes):
    """512-row windows, 1% budget (5 rows), tuner target 0.3%: after 128 rows, the rest is forecast at the
    rate so far shrunk toward 0.3% by 96 prior rows. 2 wrong -> ~5.9 forecast, over budget; 1 -> ~3.2."""
    costs = CostModel.uniform(2, [1], 0.01)
    init = ControllerState(version=0, thresholds=[0.9], active=[True])
    ctl = ThresholdController(costs, TuningConfig(window_rows=512, adjust_ramps=False), initial_state=init)
    final = np.zeros(128, np.int64)
    pred = final.copy()
    pred[:wrong] = 1  # confident and wrong: exits at ramp 0 and disagrees
    ctl.report(FeedbackWindow(np.full((128, 1), 0.99, np.float32), pred[:, None], final))
    assert any(h["action"] == "early_backoff" for h in ctl.history()) is brakes
    # The old rule (the rest forecast at the target rate alone) waits until the budget is nearly spent.
    old = ThresholdController(costs, TuningConfig(window_rows=512, adjust_ramps=False, early_guard_prior_rows=0),
                              initial_state=init)
    old.report(FeedbackWindow(np.full((128, 1), 0.99, np.float32), pred[:, None], final))
    assert not old.history()


def test_controller_windows_versions_and_json_state(tmp_path):
    costs = CostModel.uniform(6, [1, 2, 3, 4, 5], 0.01)
    cfg = TuningConfig(window_rows=256, ramp_check_windows=2, max_active=3)
    ctl = ThresholdController(costs, cfg)
    assert ctl.get_state()["version"] == 0
    w = synthetic_window(100, [0.4, 0.6, 0.7, 0.85, 0.95], seed=0)
    ctl.report(w.to_dict())  # plain lists, as sent over JSON
    ctl.report(w)
    assert ctl.get_state()["windows"] == 0  # 200 rows pending, window not full
    ctl.report(w)  # 300 rows: one window of 256 processed, 44 pending
    st = ctl.get_state()
    assert st["windows"] == 1 and st["rows"] == 300 and st["version"] >= 1
    # Five active ramps break max_active=3, so the first window already ran ramp adjustment.
    assert sum(st["active"]) <= 3 and st["ramp_changes"] == 1
    assert all(t == CLOSED for t, a in zip(st["thresholds"], st["active"]) if not a)
    json.dumps(st)
    json.dumps(ctl.history())
    assert ctl.report({"conf": [[0.5]], "pred": [[0]], "final": [0]}) == st["version"]  # wrong ramp count
    assert ctl.report({"nonsense": 1}) == st["version"]
    assert ctl.get_state()["rejected"] == 2
    ctl.flush()
    assert ctl.get_state()["windows"] == 2


def test_controller_restores_its_checkpoint(tmp_path):
    url = f"file://{tmp_path}/sub/ctl.json"
    costs = CostModel.uniform(4, [1, 2, 3], 0.01)
    cfg = TuningConfig(window_rows=300, adjust_ramps=False)
    init = ControllerState.initial(3, active=[True, False, True])
    a = ThresholdController(costs, cfg, initial_state=init, checkpoint_url=url)
    for k in range(3):
        a.report(synthetic_window(300, [0.5, 0.8, 0.95], seed=k))
    a._guard.consecutive = 1  # guard state travels with the checkpoint too
    a._save()
    before = a.get_state()
    b = ThresholdController(costs, cfg, initial_state=None, checkpoint_url=url)
    after = b.get_state()
    assert after["version"] == before["version"] >= 1
    assert after["thresholds"] == before["thresholds"] and after["active"] == [True, False, True]
    assert after["restores"] == 1 and b._guard.consecutive == 1
    # The guard's count is restored, its limits come from the config the controller restarts with.
    d = ThresholdController(costs, TuningConfig(window_rows=300, adjust_ramps=False, backoff_after=3),
                            checkpoint_url=url)
    assert d._guard.consecutive == 1 and d._guard.backoff_after == 3
    # A checkpoint for another ramp count is ignored, not trusted.
    c = ThresholdController(CostModel.uniform(3, [1, 2], 0.01), cfg, checkpoint_url=url)
    assert c.get_state()["version"] == 0


def test_a_restart_from_the_checkpoint_tunes_as_if_it_never_happened(tmp_path):
    """The tuning buffer and ramp utilities travel with the checkpoint: the restored controller's next
    windows give the same thresholds as the controller that kept running."""
    url = f"file://{tmp_path}/ctl.json"
    costs = CostModel.uniform(4, [1, 2, 3], 0.01)
    cfg = TuningConfig(window_rows=200, tune_windows=4, ramp_check_windows=6)  # a check after the restart
    init = ControllerState.initial(3, active=[True, False, True])
    a = ThresholdController(costs, cfg, initial_state=init, checkpoint_url=url)
    windows = [synthetic_window(200, [0.55, 0.75, 0.9], seed=k) for k in range(7)]
    for w in windows[:4]:
        a.report(w)
    text = (tmp_path / "ctl.json").read_text()
    assert "NaN" not in text  # strict JSON (an inactive ramp's utility is null)
    b = ThresholdController(costs, cfg, checkpoint_url=url)
    assert len(b._tune_buf) == 4 and len(b._utils) == len(a._utils) > 0
    for w in windows[4:]:
        a.report(w)
        b.report(w)
        assert b.get_state()["thresholds"] == a.get_state()["thresholds"]
        assert b.get_state()["active"] == a.get_state()["active"]
    # A checkpoint whose arrays do not fit is ignored whole: a fresh controller, not half a restored one.
    bad = json.loads(text)
    bad["tune_windows"][0]["conf"] = [[0.5, 0.5]] * 200
    (tmp_path / "ctl.json").write_text(json.dumps(bad))
    c = ThresholdController(costs, cfg, initial_state=init, checkpoint_url=url)
    assert c.get_state()["version"] == 0 and c.get_state()["restores"] == 0 and not c._tune_buf


@pytest.mark.parametrize("wrong,violates", [(1, False), (5, False), (6, True)])
def test_a_short_flushed_window_is_judged_against_a_whole_windows_budget(wrong, violates):
    """The rows left at a job's end: 1% of a 512-row window is 5.12 disagreements, however few rows came."""
    costs = CostModel.uniform(4, [1, 2, 3], 0.01)
    ctl = ThresholdController(costs, TuningConfig(window_rows=512, constraint=0.01, adjust_ramps=False),
                              initial_state=ControllerState(version=0, thresholds=[0.5, CLOSED, CLOSED],
                                                            active=[True, True, True]))
    n = 16
    pred = np.zeros((n, 3), np.int64)
    pred[:wrong, 0] = 1  # every row exits at the first ramp; `wrong` of them disagree with the final head
    ctl.report(FeedbackWindow(np.full((n, 3), 0.9, np.float32), pred, np.zeros(n, np.int64)))
    st = ctl.flush()
    assert (st["violations"], st["backoffs"]) == ((1, 1) if violates else (0, 0))
    assert ctl.history()[-1]["agreement"] == pytest.approx(1 - wrong / n)  # the history keeps what was served


def test_config_checks_name_the_field():
    with pytest.raises(ValueError, match="window_rows"):
        TuningConfig(window_rows=0)
    with pytest.raises(ValueError, match="windo_rows"):
        TuningConfig.model_validate({"windo_rows": 5})
    with pytest.raises(ValueError, match="ramps"):
        ThresholdController(CostModel.uniform(3, [1, 2], 0.01), initial_state=ControllerState.initial(3))


@pytest.mark.parametrize("constraint,rows", [(0.01, 512), (0.05, 512), (0.0, 512), (0.005, 1024),
                                             (0.00527, 972), (0.0001, 8192)])
def test_the_default_window_keeps_about_five_disagreements_of_budget(constraint, rows):
    from pipeline.config import default_window_rows

    assert default_window_rows(constraint) == rows
    assert TuningConfig(constraint=constraint).resolved().window_rows == rows
    assert TuningConfig(constraint=constraint, window_rows=64).resolved().window_rows == 64  # explicit stands
    # the resolved size travels with the config (checkpoints, the actor's get_config)
    resolved = TuningConfig(constraint=constraint).resolved()
    assert TuningConfig.model_validate(resolved.model_dump()).window_rows == rows


def test_the_default_window_fits_in_the_rows_the_controller_holds():
    # A YAML's tuning is checked at the 1% default budget; the artifact's smaller one must not break it later.
    assert TuningConfig(constraint=0.005, max_pending_rows=800).resolved().window_rows == 800
    with pytest.raises(ValueError, match="max_pending_rows"):
        TuningConfig(constraint=0.005, window_rows=1024, max_pending_rows=800)
