"""Early-exit executor on tiny random BERT / DistilBERT / RoBERTa classifiers."""
import numpy as np
import pytest
import torch

from pipeline.engine.executor import execute, finish_tail
from pipeline.engine.policy import ExitPolicy
from pipeline.model.early_exit import EarlyExitModel
from pipeline.model.ramps import RampSet
from tests.tiny import tiny_classifier

FAMILIES = ["bert", "distilbert", "roberta"]


def _model(family, num_layers=4, num_labels=3, seed=0):
    hf = tiny_classifier(family, num_layers=num_layers, num_labels=num_labels, seed=seed)
    torch.manual_seed(seed + 1)
    m = EarlyExitModel(hf, RampSet(list(range(1, num_layers)), 32, num_labels)).eval()
    # Decisive heads. A random head's logits are near-uniform, and the float noise between batch sizes
    # (it differs by CPU: seen on a 16-core machine) can flip such an argmax; these tests are not about ties.
    heads = [ramp.proj for ramp in m.ramps.ramps] + [[x for x in hf.modules() if isinstance(x, torch.nn.Linear)][-1]]
    with torch.no_grad():
        for lin in heads:
            lin.weight.mul_(10)
    return m


def _batch(B=7, S=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (B, S), generator=g)
    lengths = torch.randint(2, S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_all_ramps_closed_equals_original_model(family):
    m = _model(family)
    ids, mask = _batch()
    with torch.inference_mode():
        ref = torch.softmax(m.hf_model(input_ids=ids, attention_mask=mask).logits, -1)
    for mode in ("exit", "release"):
        out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), mode)
        assert torch.equal(out.label, ref.argmax(-1))
        torch.testing.assert_close(out.score, ref.max(-1).values, atol=1e-5, rtol=1e-5)
        assert (out.exit_layer == m.num_layers).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_batch_gets_a_mask_and_still_matches_the_original_model(family):
    """A layer always sees a mask tensor (a compiled layer shown None as well compiles a second graph)."""
    m = _model(family)
    ids = torch.randint(5, 2000, (4, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        assert isinstance(m.layer_state(m.embed(ids), mask), torch.Tensor)
        ref = torch.softmax(m.hf_model(input_ids=ids, attention_mask=mask).logits, -1)
    out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), "exit")
    assert torch.equal(out.label, ref.argmax(-1))
    torch.testing.assert_close(out.score, ref.max(-1).values, atol=1e-5, rtol=1e-5)


def _policy_that_splits(m, ids, mask):
    """Thresholds at the 80th percentile of ramp confidence: some rows exit at each ramp, some never."""
    out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), "release")
    thr = np.nanquantile(out.ramp_conf.numpy(), 0.8, axis=0)
    return ExitPolicy(thr)


@pytest.mark.parametrize("family", FAMILIES)
def test_exit_and_release_modes_give_the_same_answers(family):
    m = _model(family)
    ids, mask = _batch(B=16, seed=3)
    policy = _policy_that_splits(m, ids, mask)
    rel = execute(m, ids, mask, policy, "release")
    ex = execute(m, ids, mask, policy, "exit", shadow=torch.zeros(16, dtype=torch.bool))
    assert 0 < (rel.exit_layer < m.num_layers).sum() < 16, "the test needs some rows to exit and some not"
    assert torch.equal(rel.label, ex.label)
    assert torch.equal(rel.exit_layer, ex.exit_layer)
    torch.testing.assert_close(rel.score, ex.score, atol=1e-5, rtol=1e-5)
    # exit mode ran later layers on fewer rows; release ran every row everywhere
    assert rel.layer_rows == [16] * m.num_layers
    assert ex.layer_rows[0] == 16 and ex.layer_rows[-1] < 16


@pytest.mark.parametrize("family", FAMILIES)
def test_prediction_does_not_depend_on_batch_mates(family):
    m = _model(family)
    ids, mask = _batch(B=12, seed=5)
    policy = _policy_that_splits(m, ids, mask)
    together = execute(m, ids, mask, policy, "exit")
    for i in range(12):
        width = int(mask[i].sum())
        alone = execute(m, ids[i : i + 1, :width], mask[i : i + 1, :width], policy, "exit")
        assert alone.label.item() == together.label[i].item()
        assert alone.exit_layer.item() == together.exit_layer[i].item()
        assert abs(alone.score.item() - together.score[i].item()) < 1e-4
    # and a different grouping of the same rows (reversed order)
    rev = execute(m, ids.flip(0), mask.flip(0), policy, "exit")
    assert torch.equal(rev.label.flip(0), together.label)


def test_threshold_zero_exits_every_row_at_the_first_ramp():
    m = _model("bert")
    ids, mask = _batch()
    thr = np.array([0.0, 1.0, 1.0])
    out = execute(m, ids, mask, ExitPolicy(thr), "exit")
    assert (out.exit_layer == 1).all()
    assert out.layer_rows == [7]  # nothing ran after layer 1
    ramp = torch.softmax(m.ramp(0, m.layer(0, m.embed(ids), m.layer_state(m.embed(ids), mask)), mask), -1)
    assert torch.equal(out.label, ramp.argmax(-1))


def test_inactive_ramp_never_exits():
    m = _model("bert")
    ids, mask = _batch()
    out = execute(m, ids, mask, ExitPolicy(np.zeros(3), active=np.array([False, True, True])), "exit")
    assert (out.exit_layer == 2).all()


def test_feedback_rows_release_all_exit_only_shadow():
    m = _model("bert")
    ids, mask = _batch(B=10, seed=7)
    policy = _policy_that_splits(m, ids, mask)
    with torch.inference_mode():
        final = m.hf_model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    rel = execute(m, ids, mask, policy, "release")
    assert rel.feedback_rows.tolist() == list(range(10))
    assert torch.equal(rel.final_pred, final)
    assert not torch.isnan(rel.ramp_conf).any()  # every ramp recorded for feedback rows
    shadow = torch.zeros(10, dtype=torch.bool)
    shadow[[2, 5]] = True
    ex = execute(m, ids, mask, policy, "exit", shadow=shadow)
    assert ex.feedback_rows.tolist() == [2, 5]
    assert torch.equal(ex.final_pred, final[[2, 5]])
    torch.testing.assert_close(ex.ramp_conf, rel.ramp_conf[[2, 5]], atol=1e-5, rtol=1e-5)
    # a shadow row still answers as if it had exited
    assert torch.equal(ex.label, rel.label)


def test_bad_mode_and_policy_size_are_errors():
    m = _model("bert")
    ids, mask = _batch()
    with pytest.raises(ValueError, match="mode"):
        execute(m, ids, mask, ExitPolicy.closed(3), "fast")
    with pytest.raises(ValueError, match="thresholds"):
        execute(m, ids, mask, ExitPolicy.closed(5), "exit")


@pytest.mark.skipif(not hasattr(torch, "bfloat16"), reason="no bfloat16 in this torch")
def test_bfloat16_runs_on_cpu_and_mostly_agrees():
    m = _model("bert")
    ids, mask = _batch(B=32, seed=9)
    ref = execute(m, ids, mask, ExitPolicy.closed(3), "exit")
    out = execute(m.to(torch.bfloat16), ids, mask, ExitPolicy.closed(3), "exit")
    assert out.score.dtype == torch.float32
    assert (out.label == ref.label).float().mean() >= 0.8


def test_release_tail_deferred_then_finished_matches_running_it_at_once_and_can_stop():
    """Release mode with defer_tail: the hot path is exit mode's; the tail holds every non-shadow row and,
    finished later, gives the same feedback as release mode running every row to the end in the batch.
    A stop between layers drops the whole tail (no half feedback)."""
    m = _model("bert")
    ids, mask = _batch(B=10, seed=7)
    policy = _policy_that_splits(m, ids, mask)
    shadow = torch.zeros(10, dtype=torch.bool)
    shadow[[3, 8]] = True
    now = execute(m, ids, mask, policy, "release", shadow=shadow)  # every row to the end, in the batch
    assert now.tail is None and now.feedback_rows.tolist() == list(range(10))
    assert now.layer_rows == [10] * m.num_layers
    hot = execute(m, ids, mask, policy, "release", shadow=shadow, defer_tail=True)
    ex = execute(m, ids, mask, policy, "exit", shadow=shadow)
    # The hot path is exit mode's: same answers, same rows per layer, the shadow rows as feedback.
    assert torch.equal(hot.label, ex.label) and torch.equal(hot.exit_layer, ex.exit_layer)
    assert hot.layer_rows == ex.layer_rows and hot.feedback_rows.tolist() == [3, 8]
    assert (ex.exit_layer < m.num_layers).any() and (ex.exit_layer == m.num_layers).any()  # both kinds in the tail
    assert hot.tail.rows == 8
    assert finish_tail(m, hot.tail, stop=lambda: True) is None  # work waits: the tail is dropped
    done = finish_tail(m, hot.tail)
    order = torch.argsort(done.rows)
    assert done.rows[order].tolist() == [0, 1, 2, 4, 5, 6, 7, 9]
    with torch.inference_mode():
        final = m.hf_model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    assert torch.equal(done.final_pred[order], final[done.rows[order]])
    assert torch.equal(done.final_pred[order], now.final_pred[done.rows[order]])
    torch.testing.assert_close(done.ramp_conf[order], now.ramp_conf[done.rows[order]], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(done.ramp_conf).any()  # every ramp recorded for every row


@pytest.mark.parametrize("mode", ["exit", "release"])
def test_shape_multiples_change_shapes_not_answers(mode):
    """Rows that exited ride along to keep the batch at a multiple of 8 rows and columns: the layers see only
    such shapes, and every answer and feedback row is what exact shapes give."""
    m = _model("bert")
    ids, mask = _batch(B=21, S=19, seed=5)
    policy = _policy_that_splits(m, ids, mask)
    shadow = torch.arange(21) % 5 == 0
    exact = execute(m, ids, mask, policy, mode, shadow)
    seen = []
    layer = m.layer
    m.layer = lambda i, h, state: (seen.append(tuple(h.shape[:2])), layer(i, h, state))[1]
    padded = execute(m, ids, mask, policy, mode, shadow, multiple=8)
    assert torch.equal(padded.label, exact.label) and torch.equal(padded.exit_layer, exact.exit_layer)
    assert torch.equal(padded.feedback_rows, exact.feedback_rows) and torch.equal(padded.final_pred, exact.final_pred)
    after_first = [s for s in seen if s != (21, 19)]  # the first batch is as given; later ones are trimmed
    if mode == "release":  # every row runs to the end in the batch: nothing is trimmed
        assert not after_first
    else:
        # widths round up to 8 but never past the batch's own (19: given unrounded here, as Predictor would not)
        assert after_first and all(r % 8 == 0 and (w % 8 == 0 or w == 19) for r, w in after_first)
    assert sum(padded.layer_rows) >= sum(exact.layer_rows)  # ride-along rows are compute spent, and counted
