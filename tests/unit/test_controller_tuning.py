"""How the controller tunes: the whole buffer, and the newest windows alone (``recent_windows``)."""
import numpy as np
import pytest

from pipeline.config import TuningConfig
from pipeline.control.controller import ThresholdController
from pipeline.control.synthetic import synthetic_window
from pipeline.control.tuner import tune_thresholds
from pipeline.feedback import CostModel, FeedbackWindow

SKILLS = [0.45, 0.55, 0.65, 0.8, 0.9]
COSTS = CostModel.uniform(6, [1, 2, 3, 4, 5], ramp_cost=0.004)


def _run(recent: int, windows, costs: CostModel = COSTS) -> ThresholdController:
    # Judged at 5% (no back-off floors get in the way), tuned to 1%.
    cfg = TuningConfig(window_rows=512, recent_windows=recent, adjust_ramps=False, max_active=None,
                           constraint=0.05, tune_headroom=0.2)
    ctl = ThresholdController(costs, cfg)
    for w in windows:
        ctl.report(w)
    return ctl


def _two_ramps(rows: int, seed: int, wrong0: float) -> FeedbackWindow:
    """Ramp 0 is wrong on a share ``wrong0`` of rows whatever its confidence; ramp 1 is always right."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, rows)
    p0 = np.where(rng.uniform(size=rows) < wrong0, 1 - final, final)
    conf = rng.uniform(0.6, 1.0, (rows, 2)).astype(np.float32)
    return FeedbackWindow(conf, np.stack([p0, final], 1), final)


def test_newest_windows_hold_the_thresholds_up_when_inputs_get_harder():
    easy = [_two_ramps(512, k, 0.0) for k in range(6)]
    hard = [_two_ramps(512, 100 + k, 0.03) for k in range(2)]  # ramp 0's confidence stops meaning much
    costs = CostModel.uniform(3, [1, 2], 0.01)
    whole, recent = (_run(r, easy + hard, costs) for r in (0, 2))
    assert not any(h["backed_off"] for c in (whole, recent) for h in c.history())  # no floors involved
    t_whole, t_recent = (np.array(c.get_state()["thresholds"]) for c in (whole, recent))
    # The same 8-window buffer; with recent_windows=2 no ramp opens further than the two hard windows allow.
    kw = dict(init_step=0.01, min_step=0.001)
    target = 0.05 * 0.2
    t_buf = tune_thresholds(FeedbackWindow.concat(easy + hard), costs, target, **kw).thresholds
    t_new = tune_thresholds(FeedbackWindow.concat(hard), costs, target, **kw).thresholds
    assert t_whole == pytest.approx(t_buf)
    assert t_recent == pytest.approx(np.maximum(t_buf, t_new))
    assert t_recent[0] > t_whole[0] + 0.05
    # The history reports the outcome of the thresholds actually set, on the whole buffer.
    h = recent.history()[-1]
    assert h["thresholds"] == pytest.approx(t_recent.tolist()) and h["tuned_agreement"] >= 1 - target


def test_recent_windows_off_or_covering_the_buffer_changes_nothing():
    ws = [synthetic_window(512, SKILLS, seed=k) for k in range(3)]
    base = _run(0, ws).get_state()["thresholds"]
    assert _run(8, ws).get_state()["thresholds"] == base  # 3 windows buffered: the newest 8 are the buffer
    with pytest.raises(ValueError, match="recent_windows"):
        TuningConfig(recent_windows=-1)


def test_a_controller_tuning_on_the_newest_windows_recovers_without_backing_off():
    # Ramp 0 turns from always right into a confident coin flip. Tuned on the whole buffer only, the old rows
    # keep it open and the guard has to back it off; with the newest windows it is shut after one violation.
    from tests.unit.test_guard import _stream

    costs = CostModel.uniform(3, [1, 2], 0.01)
    for recent, expect in ((2, ["retune", "ok", "ok", "ok"]), (0, ["retune", "backoff"])):
        cfg = TuningConfig(window_rows=200, adjust_ramps=False, backoff_after=2, recent_windows=recent)
        ctl = ThresholdController(costs, cfg)
        for k in range(8):
            ctl.report(_stream(200, k, ramp0_right=k < 4))
        assert [h["action"] for h in ctl.history()[4:]][: len(expect)] == expect
