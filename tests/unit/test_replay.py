"""Replay: vanilla / static / controller / oracle over recorded windows (synthetic streams, no Ray)."""
import json

import numpy as np
import pytest

from pipeline.control.replay import (
    METHODS,
    aggregate,
    drift_stream,
    hardest,
    oracle_outcome,
    plot,
    replay,
    shuffled,
    window_bounds,
    write_json,
)
from pipeline.control.state import ControllerState
from pipeline.control.synthetic import synthetic_window
from pipeline.feedback import CLOSED, CostModel, FeedbackWindow

COSTS = CostModel.uniform(6, [1, 2, 3, 4, 5], ramp_cost=0.004)
SKILLS = [0.45, 0.55, 0.65, 0.8, 0.9]


def _regime(rows: int, seed: int, drifted: bool) -> FeedbackWindow:
    """Two ramps (layers 2 and 4 of 6). In-domain, ramp 0 is right whenever it is confident (conf >= 0.8)
    and wrong below 0.6; after the drift it is confidently wrong 40% of the time (the confidence-agreement
    relation changes). Ramp 1 is always right and confident in both regimes."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, rows)
    conf0 = rng.uniform(0.8, 1.0, rows)
    if drifted:
        right0 = rng.uniform(size=rows) >= 0.4
    else:
        right0 = rng.uniform(size=rows) >= 0.2
        conf0 = np.where(right0, conf0, rng.uniform(0.5, 0.6, rows))
    pred0 = np.where(right0, final, 1 - final)
    conf1 = rng.uniform(0.9, 1.0, rows)
    return FeedbackWindow(np.stack([conf0, conf1], 1), np.stack([pred0, final], 1), final)


TWO = CostModel.uniform(6, [2, 4], ramp_cost=0.004)


def test_window_bounds_cover_every_row_once_and_merge_a_short_tail():
    assert window_bounds(1000, 256) == [(0, 256), (256, 512), (512, 768), (768, 1000)]  # 232 >= 128: own window
    assert window_bounds(1000, 300) == [(0, 300), (300, 600), (600, 1000)]  # 100 < 150 joins the last one
    assert window_bounds(100, 256) == [(0, 100)]
    assert window_bounds(0, 256) == []
    for n, w in ((1, 1), (977, 64), (4096, 512)):
        b = window_bounds(n, w)
        assert b[0][0] == 0 and b[-1][1] == n and all(x[1] == y[0] for x, y in zip(b, b[1:]))
    with pytest.raises(ValueError, match="window_rows"):
        window_bounds(10, 0)


def test_oracle_exits_at_the_first_agreeing_ramp():
    # 3 layers, ramps after layers 1 and 2; rows: ramp 0 right / only ramp 1 right / nobody right.
    costs = CostModel.uniform(3, [1, 2], ramp_cost=0.0)
    w = FeedbackWindow(conf=np.full((3, 2), 0.6), pred=[[1, 0], [0, 1], [0, 0]], final=[1, 1, 1])
    sav, lsav, counts = oracle_outcome(w, costs)
    assert counts.tolist() == [1, 1]
    assert lsav == pytest.approx(1 - (1 + 2 + 3) / 9) and sav == pytest.approx(lsav)  # ramps free here


def test_vanilla_oracle_and_accounting_on_a_stationary_stream():
    boot = synthetic_window(1000, SKILLS, seed=1)
    stream = synthetic_window(3000, SKILLS, seed=2)
    res = replay(stream, COSTS, boot, constraint=0.01, window_rows=256)
    bounds = window_bounds(3000, 256)
    assert res.bounds == bounds and len(bounds) == 12  # 11 full + 184 rows (>= 128: a window of its own)
    for m in METHODS:
        s = res.methods[m]
        assert len(s.agreement) == len(s.savings) == len(s.active) == len(bounds)
        assert sum(s.rows) == 3000 == res.summary()[m]["rows"]
    van, ora = res.methods["vanilla"], res.methods["oracle"]
    assert set(van.agreement) == {1.0} and set(van.savings) == {0.0} and set(van.layer_savings) == {0.0}
    assert set(ora.agreement) == {1.0}
    for k in range(len(bounds)):  # the oracle saves the most in every window
        for m in ("static", "controller"):
            assert ora.layer_savings[k] >= res.methods[m].layer_savings[k]
    summ = res.summary()
    assert summ["oracle"]["violating_windows"] == 0 and summ["vanilla"]["savings"] == 0.0
    assert summ["controller"]["judged_windows"] == len(bounds) - 1  # the first window is not judged
    # The controller processed every full window once (the short last one stays pending), one tuner time each.
    full = sum(1 for a, b in bounds if b - a >= 256)
    assert len(res.controller_history) == len(res.tuner_ms) == len(res.window_ms) == full
    assert all(t >= 0 for t in res.tuner_ms)


def test_controller_is_replayed_in_online_order():
    boot = synthetic_window(1000, SKILLS, seed=1)
    stream = synthetic_window(2048, SKILLS, seed=3)
    init = ControllerState(version=0, thresholds=[0.97, 0.96, 0.95, 0.9, 0.9], active=[True] * 5)
    res = replay(stream, COSTS, boot, window_rows=256, initial_state=init)
    ctl, hist = res.methods["controller"], res.controller_history
    assert ctl.version[0] == 0 and ctl.thresholds[0] == init.thresholds and ctl.active[0] == [0, 1, 2, 3, 4]
    for k in range(1, len(ctl.version)):  # window k is served with the state window k-1 produced
        assert ctl.thresholds[k] == hist[k - 1]["thresholds"]
        assert ctl.active[k] == np.flatnonzero(hist[k - 1]["active"]).tolist()
        assert ctl.version[k] == hist[k - 1]["version"]
    # Realized agreement in the controller's own history is the one replay reports for that window.
    assert [h["agreement"] for h in hist] == pytest.approx(ctl.agreement)


def test_warm_start_tunes_on_the_bootstrap_rows_before_the_stream():
    boot = synthetic_window(1000, SKILLS, seed=1)
    stream = synthetic_window(1024, SKILLS, seed=3)
    init = ControllerState(version=0, thresholds=[0.99, 0.98, 0.97, 0.96, 0.95], active=[True] * 5)
    cold = replay(stream, COSTS, boot, window_rows=256, ramp_budget=3, initial_state=init)
    warm = replay(stream, COSTS, boot, window_rows=256, ramp_budget=3, initial_state=init, warm_start=True)
    assert cold.methods["controller"].thresholds[0] == init.thresholds and cold.meta["warm_start_windows"] == 0
    assert warm.meta["warm_start_windows"] == 3  # whole windows of 256 only: the 232-row remainder is left out
    w0 = warm.methods["controller"]
    assert w0.version[0] > 0 and w0.thresholds[0] != init.thresholds and len(w0.active[0]) <= 3
    assert len(warm.controller_history) == len(cold.controller_history) == 4  # stream windows only
    # Rows of their own (an artifact's validation feedback) seed it the same way.
    own = replay(stream, COSTS, boot, window_rows=256, ramp_budget=3, initial_state=init,
                 warm_start=boot.slice(0, 768))
    assert own.meta["warm_start_windows"] == 3 and own.methods["controller"].thresholds == w0.thresholds


def test_ramp_budget_caps_the_controllers_active_ramps():
    boot = synthetic_window(1000, SKILLS, seed=1)
    stream = synthetic_window(2560, SKILLS, seed=4)
    res = replay(stream, COSTS, boot, window_rows=256, ramp_budget=2)
    assert res.controller_config["max_active"] == 2
    assert max(len(a) for a in res.methods["controller"].active[1:]) <= 2
    assert all(len(a) == 5 for a in res.methods["static"].active)  # the baseline uses every ramp


def test_controller_never_violates_on_a_stationary_stream_of_easy_rows():
    easy = [2.0, 2.2, 2.4, 2.6, 2.8]  # every ramp agrees with the original model on (almost) every row
    boot = synthetic_window(1000, easy, seed=5)
    stream = synthetic_window(4096, easy, seed=6)
    res = replay(stream, COSTS, boot, constraint=0.01, window_rows=256)
    s = res.summary()["controller"]
    assert s["violating_windows"] == 0 and s["worst_window_agreement"] >= 0.99
    assert not any(res.methods["controller"].violations(0.01))
    assert s["savings"] > 0.5 * res.summary()["oracle"]["savings"]  # it opens the early ramps


def test_static_breaks_under_drift_and_the_controller_recovers():
    boot = _regime(1000, 10, drifted=False)
    before, after = _regime(2560, 11, drifted=False), _regime(3072, 12, drifted=True)
    stream, at = drift_stream(before, after)
    res = replay(stream, TWO, boot, constraint=0.01, window_rows=256, drift_at=at, name="drift")
    assert res.drift_at == 2560 and res.drift_window == 10
    pre, post = res.summary("before"), res.summary("after")
    assert res.static_threshold <= 0.8  # the bootstrap split says ramp 0 is safe when confident
    assert pre["static"]["violating_windows"] == 0 and pre["controller"]["violating_windows"] == 0
    assert post["static"]["violating_windows"] == post["static"]["judged_windows"] == 12  # every drifted window
    ctl_viol = np.flatnonzero(res.methods["controller"].violations(0.01)).tolist()
    assert len(ctl_viol) <= 3 and all(10 <= k <= 13 for k in ctl_viol)  # only right after the drift
    assert post["controller"]["hold_rate"] >= 0.75 and post["controller"]["savings"] > 0.2  # ramp 1 still saves
    assert post["controller"]["agreement"] > post["static"]["agreement"] + 0.1


def test_refreshing_within_windows_lets_the_controller_brake_inside_the_first_drifted_window():
    boot = _regime(1000, 10, drifted=False)
    stream, at = drift_stream(_regime(2560, 11, drifted=False), _regime(3072, 12, drifted=True))
    kw = dict(constraint=0.01, window_rows=256, drift_at=at)
    whole = replay(stream, TWO, boot, **kw)
    fine = replay(stream, TWO, boot, refresh_rows=64, **kw)
    assert whole.meta["refresh_rows"] == 256 and whole.meta["early_backoffs"] == 0
    assert fine.meta["early_backoffs"] >= 1
    d = fine.drift_window
    w_ctl, f_ctl = whole.methods["controller"], fine.methods["controller"]
    assert f_ctl.agreement[d] > w_ctl.agreement[d]  # the first drifted window: braked after 64-128 rows
    assert fine.summary("after")["controller"]["violating_windows"] <= whole.summary("after")["controller"]["violating_windows"]
    # The controller's own account of each window (rows before a brake at the thresholds then in force) is
    # what replay measured block by block.
    ends = [h for h in fine.controller_history if h["action"] != "early_backoff"]
    assert [h["agreement"] for h in ends] == pytest.approx(f_ctl.agreement[: len(ends)])
    assert any(h["action"] == "early_backoff" for h in fine.controller_history)
    with pytest.raises(ValueError, match="refresh_rows"):
        replay(stream, TWO, boot, refresh_rows=0, **kw)


def test_hardest_keeps_the_rows_the_original_model_is_least_sure_of():
    w = synthetic_window(200, SKILLS, seed=8)
    conf = np.linspace(1.0, 0.5, 200)  # row i: confidence falls with i
    h = hardest(w, conf, 0.25)
    assert len(h) == 50 and np.array_equal(h.conf, w.conf[150:]) and np.array_equal(h.final, w.final[150:])
    assert len(hardest(w, conf, 1.0)) == 200
    with pytest.raises(ValueError, match="rows"):
        hardest(w, conf[:10])
    with pytest.raises(ValueError, match="share"):
        hardest(w, conf, 0.0)


def test_settled_segment_and_aggregate_over_orders():
    boot = _regime(1000, 10, drifted=False)
    runs = []
    for seed in range(3):
        stream, at = drift_stream(_regime(1024, 30 + seed, False), _regime(1536, 40 + seed, True))
        runs.append(replay(stream, TWO, boot, window_rows=256, drift_at=at))
    r = runs[0]
    assert r.drift_window == 4
    assert r.summary("after")["static"]["windows"] == 6 and r.summary("settled")["static"]["windows"] == 5
    assert r.summary("before")["static"]["windows"] == 4
    with pytest.raises(ValueError, match="segment"):
        r.summary("later")
    agg = aggregate(runs, "after")
    per = [x.summary("after")["controller"] for x in runs]
    assert agg["controller"]["replays"] == 3
    assert agg["controller"]["violating_windows"] == sum(p["violating_windows"] for p in per)
    assert agg["controller"]["judged_windows"] == 18
    assert agg["controller"]["savings"] == pytest.approx(np.mean([p["savings"] for p in per]))
    assert agg["static"]["worst_window_agreement"] == min(x.summary("after")["static"]["worst_window_agreement"]
                                                         for x in runs)
    assert aggregate([]) == {}


def test_shuffled_keeps_rows_together():
    w = synthetic_window(50, SKILLS, seed=7)
    s = shuffled(w, seed=1)
    assert sorted(map(tuple, s.conf.tolist())) == sorted(map(tuple, w.conf.tolist()))
    k = int(np.flatnonzero((s.conf == w.conf[0]).all(1))[0])
    assert s.final[k] == w.final[0] and (s.pred[k] == w.pred[0]).all()
    assert np.array_equal(shuffled(w, seed=1).conf, s.conf)  # deterministic


def test_replay_refuses_mismatched_inputs():
    w = synthetic_window(100, SKILLS[:2], seed=0)
    with pytest.raises(ValueError, match="ramps"):
        replay(w, COSTS, w)
    with pytest.raises(ValueError, match="non-empty"):
        replay(FeedbackWindow.empty(5), COSTS, synthetic_window(10, SKILLS))


def test_json_and_png_are_written(tmp_path):
    boot = _regime(600, 20, drifted=False)
    stream, at = drift_stream(_regime(768, 21, False), _regime(768, 22, True))
    a = replay(_regime(768, 21, False), TWO, boot, window_rows=128, name="in-domain")
    b = replay(stream, TWO, boot, window_rows=128, drift_at=at, name="drift")
    jpath = write_json([a, b], tmp_path / "out" / "replay.json", {"model": "synthetic"})
    doc = json.loads(jpath.read_text())
    assert doc["model"] == "synthetic" and set(doc["scenarios"]) == {"in-domain", "drift"}
    d = doc["scenarios"]["drift"]
    assert d["drift_at"] == 768 and d["drift_window"] == 6 and len(d["windows"]) == 12
    for m in METHODS:
        assert len(d["series"][m]["agreement"]) == 12 and m in d["summary"] and m in d["summary_after_drift"]
    assert doc["scenarios"]["in-domain"]["summary_after_drift"] is None
    assert d["tuner"]["tune_ms"]["max"] >= 0 and len(d["controller_history"]) == 12
    pytest.importorskip("matplotlib")
    ppath = plot([a, b], tmp_path / "out" / "replay.png", title="synthetic")
    data = ppath.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_record_ramps_returns_rows_in_caller_order(tiny_artifact):
    from pipeline.engine.ramp_outputs import record_ramps

    texts = ["a wonderful film", "dreadful", "an utterly forgettable and overlong sequel", "fine", "bad"] * 3
    w = record_ramps(tiny_artifact, texts, chunk_rows=4)
    assert len(w) == 15 and w.num_ramps == 3  # the tiny model has 4 layers: ramps after 1..3
    assert ((w.conf >= 0.5 - 1e-6) & (w.conf <= 1.0 + 1e-6)).all()
    back = record_ramps(tiny_artifact, texts[::-1], chunk_rows=64)
    assert np.allclose(back.conf[::-1], w.conf, atol=1e-5)
    assert np.array_equal(back.final[::-1], w.final) and np.array_equal(back.pred[::-1], w.pred)
    assert np.array_equal(w.final[:5], w.final[5:10])  # same text, same answer wherever it sits
    with pytest.raises(ValueError, match="text 1"):
        record_ramps(tiny_artifact, ["ok", ""])


def test_closed_static_when_no_grid_value_fits():
    # Every ramp is a coin flip: no grid value keeps 99% agreement, so the baseline never exits.
    rng = np.random.default_rng(0)
    final = rng.integers(0, 2, 800)
    pred = np.stack([rng.integers(0, 2, 800)] * 2, 1)
    w = FeedbackWindow(rng.uniform(0.5, 1.0, (800, 2)), pred, final)
    res = replay(w, TWO, w, window_rows=200, static_grid=[0.5, 0.7, 0.9])
    assert res.static_threshold == CLOSED
    assert set(res.methods["static"].savings) == {0.0} and set(res.methods["static"].agreement) == {1.0}
    assert res.methods["static"].active == [[]] * 4  # no exits deployed: no ramp cost either
