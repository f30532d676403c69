"""Warm start: the artifact's validation feedback file and a fresh controller tuning on it first."""
import logging

import numpy as np
import pytest

from pipeline.config import TuningConfig
from pipeline.control.controller import ThresholdController
from pipeline.control.state import ControllerState
from pipeline.control.synthetic import synthetic_window
from pipeline.feedback import CostModel, FeedbackWindow
from pipeline.model.artifact import VALIDATION_FEEDBACK, load_validation_feedback, save_validation_feedback

SKILLS = [0.45, 0.55, 0.65, 0.8, 0.9]
COSTS = CostModel.uniform(6, [1, 2, 3, 4, 5], ramp_cost=0.004)
INIT = ControllerState(version=0, thresholds=[0.99, 0.98, 0.97, 0.96, 0.95], active=[True] * 5)


# ----------------------------------------------------------------------------- controller
def test_fresh_controller_tunes_on_whole_windows_of_the_warm_rows():
    cfg = TuningConfig(window_rows=256, max_active=3)  # the ramp budget is enforced on warm windows too
    warm = synthetic_window(1000, SKILLS, seed=1)
    ctl = ThresholdController(COSTS, cfg, INIT, warm_start=warm.to_dict())  # dict form, as over Ray
    st = ctl.get_state()
    assert st["warm_windows"] == 3  # 3 x 256; the 232-row remainder is left out
    assert st["windows"] == 0 and st["rows"] == 0 and st["reports"] == 0  # live counters untouched
    assert st["version"] > 0 and st["thresholds"] != INIT.thresholds and sum(st["active"]) <= 3
    hist = ctl.history()
    assert [h["warm"] for h in hist] == [True] * 3 and hist[-1]["tuned_rows"] == 768
    ctl.report(synthetic_window(256, SKILLS, seed=2))
    last = ctl.history()[-1]
    assert not last["warm"] and last["window"] == 1 and ctl.get_state()["windows"] == 1
    assert last["tuned_rows"] == 1024  # the first live re-tune sees the warm rows too


def test_warm_start_matches_reporting_the_same_rows_when_no_window_misses():
    cfg = TuningConfig(window_rows=256)
    warm = synthetic_window(768, SKILLS, seed=1)
    a = ThresholdController(COSTS, cfg, INIT, warm_start=warm)
    b = ThresholdController(COSTS, cfg, INIT)
    b.report(warm)
    assert a.get_state()["thresholds"] == b.get_state()["thresholds"]
    assert a.get_state()["active"] == b.get_state()["active"]


def test_a_warm_window_that_misses_the_budget_tunes_but_never_backs_off():
    # Thresholds far too low for these rows: as live feedback the first window is a violation and backs off.
    low = ControllerState(version=0, thresholds=[0.55] * 5, active=[True] * 5)
    cfg = TuningConfig(window_rows=256)
    rows = synthetic_window(512, SKILLS, seed=3)
    live = ThresholdController(COSTS, cfg, low)
    live.report(rows)
    assert live.get_state()["violations"] >= 1 and live.get_state()["backoffs"] >= 1
    # Warm rows were never served: the same rows only tune, and no floor holds the next live windows back.
    warm = ThresholdController(COSTS, cfg, low, warm_start=rows)
    st = warm.get_state()
    assert st["warm_windows"] == 2 and st["violations"] == 0 and st["backoffs"] == 0
    assert [h["action"] for h in warm.history()] == ["ok", "ok"] and warm.history()[0]["agreement"] < 0.99
    assert not warm._floors.any() and st["thresholds"] != low.thresholds


def test_short_warm_start_is_one_short_window_and_none_is_a_cold_start():
    cfg = TuningConfig(window_rows=512)
    ctl = ThresholdController(COSTS, cfg, INIT, warm_start=synthetic_window(100, SKILLS, seed=1))
    assert ctl.get_state()["warm_windows"] == 1 and ctl.history()[0]["rows"] == 100
    cold = ThresholdController(COSTS, cfg, INIT)
    assert cold.get_state()["warm_windows"] == 0 and cold.get_state()["thresholds"] == INIT.thresholds
    empty = ThresholdController(COSTS, cfg, INIT, warm_start=FeedbackWindow.empty(5))
    assert empty.get_state()["warm_windows"] == 0 and empty.get_state()["version"] == 0
    with pytest.raises(ValueError, match="ramps"):
        ThresholdController(COSTS, cfg, INIT, warm_start=synthetic_window(100, SKILLS[:3], seed=1))


def test_a_restored_checkpoint_wins_over_the_warm_rows(tmp_path):
    url = f"file://{tmp_path}/ctl.json"
    cfg = TuningConfig(window_rows=256)
    warm = synthetic_window(1000, SKILLS, seed=1)
    a = ThresholdController(COSTS, cfg, INIT, checkpoint_url=url, warm_start=warm)
    a.report(synthetic_window(256, SKILLS, seed=2))
    b = ThresholdController(COSTS, cfg, INIT, checkpoint_url=url, warm_start=warm)
    assert b.get_state()["restores"] == 1
    assert b.get_state()["warm_windows"] == 3 and b.history() == []  # nothing processed again
    assert b.get_state()["thresholds"] == a.get_state()["thresholds"]


# ----------------------------------------------------------------------------- the artifact file
def _fake_artifact(tmp_path, ramps_bytes=b"ramps"):
    (tmp_path / "ramps.safetensors").write_bytes(ramps_bytes)
    return tmp_path


def test_feedback_file_round_trip_and_missing_file_is_none(tmp_path):
    art = _fake_artifact(tmp_path)
    assert load_validation_feedback(art) is None  # old artifacts: no file, no error
    w = synthetic_window(50, SKILLS, seed=0)
    path = save_validation_feedback(art, w.conf, w.pred, w.final)
    assert path.name == VALIDATION_FEEDBACK and path.read_bytes()[:8]  # safetensors, not pickle
    conf, pred, final = load_validation_feedback(art, num_ramps=5)
    assert conf.dtype == np.float32 and pred.dtype == np.int64 and final.dtype == np.int64
    assert np.array_equal(conf, w.conf) and np.array_equal(pred, w.pred) and np.array_equal(final, w.final)
    with pytest.raises(ValueError, match="shapes"):
        save_validation_feedback(art, w.conf, w.pred[:, :3], w.final)


def test_feedback_file_that_does_not_fit_is_ignored_with_a_warning(tmp_path, caplog):
    art = _fake_artifact(tmp_path)
    w = synthetic_window(50, SKILLS, seed=0)
    save_validation_feedback(art, w.conf, w.pred, w.final)
    with caplog.at_level(logging.WARNING):
        assert load_validation_feedback(art, num_ramps=4) is None  # another ramp count
        (art / "ramps.safetensors").write_bytes(b"other ramps")
        assert load_validation_feedback(art, num_ramps=5) is None  # written for other ramps
        (art / VALIDATION_FEEDBACK).write_bytes(b"not a safetensors file")
        assert load_validation_feedback(art) is None
    assert caplog.text.count("ignoring") == 3


def test_bootstrap_writes_the_feedback_and_it_can_be_recomputed(tiny_artifact, tmp_path):
    import shutil

    from pipeline.control.deployment import warm_start_window
    from pipeline.model.artifact import read_manifest
    from pipeline.training.bootstrap import write_validation_feedback

    manifest = read_manifest(tiny_artifact)
    w = warm_start_window(tiny_artifact, manifest)
    assert w is not None and w.num_ramps == len(manifest.ramps)
    assert len(w) == manifest.bootstrap["validation_rows"]
    agree = (w.pred == w.final[:, None]).mean(0)
    assert agree == pytest.approx([r.val_agreement for r in manifest.ramps])
    # An artifact without the file (made before it existed) gets it back from the saved model alone.
    old = tmp_path / "old"
    shutil.copytree(tiny_artifact, old)
    (old / VALIDATION_FEEDBACK).unlink()
    assert warm_start_window(str(old), manifest) is None
    report = write_validation_feedback(str(old))
    assert report["rows"] == len(w)
    again = warm_start_window(str(old), manifest)
    assert np.array_equal(again.pred, w.pred) and np.array_equal(again.final, w.final)
    assert np.allclose(again.conf, w.conf, atol=1e-5)


def test_an_exit_mode_start_is_certified_on_the_validation_feedback(tiny_artifact):
    """Serve's exit mode starts its controller from thresholds that pass Learn then Test on the artifact's
    validation feedback at the app's budget: on those rows their disagreement is within the certified bound."""
    from pipeline.control.deployment import calibrated_start, cost_model, warm_start_window
    from pipeline.control.tuner import evaluate
    from pipeline.model.artifact import read_manifest

    manifest = read_manifest(tiny_artifact)
    thresholds, evidence = calibrated_start(tiny_artifact, manifest, 0.05)
    assert len(thresholds) == len(manifest.ramps) and evidence["test_rows"] > 0
    if evidence["chosen"] < 0:  # nothing passed: every ramp closed
        assert thresholds == [1.0] * len(thresholds)
    else:  # the certified set: its bound is within the budget, and on the rows it was tested on it holds
        assert evidence["upper_bound"] <= 0.05
        window = warm_start_window(tiny_artifact, manifest)
        out = evaluate(window, cost_model(manifest), np.asarray(thresholds), np.asarray(manifest.active))
        assert 1 - out.agreement <= evidence["upper_bound"] + 0.03  # the tune rows are in the window too
