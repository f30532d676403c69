"""Head kinds: what an answer is for single-label, regression and multi-label heads."""
import pytest
import torch

from pipeline.model.heads import MultiLabel, Regression, SingleLabel, head_from_scores, head_kind, kind_of_config


def test_single_label_is_argmax_and_max_softmax():
    head = SingleLabel(["neg", "pos"])
    d = head.decide(torch.tensor([[0.0, 2.0], [3.0, -1.0]]))
    assert d.answer.tolist() == [1, 0]
    p = torch.softmax(torch.tensor([0.0, 2.0]), -1)
    assert d.conf[0] == pytest.approx(float(p.max())) and d.score[0] == d.conf[0]
    assert [head.label(i) for i in d.answer.tolist()] == ["pos", "neg"]


def test_regression_bins_round_half_up_and_clamp_to_the_range():
    head = Regression.rounding(["LABEL_0"], -0.2, 5.3)
    assert head.values == [0, 1, 2, 3, 4, 5] and head.ramp_outputs == 6
    scores = torch.tensor([[-3.0], [0.49], [0.5], [2.05], [4.7], [9.0]])
    d = head.decide(scores)
    assert d.answer.tolist() == [0, 0, 1, 2, 5, 5]
    assert [head.label(i) for i in d.answer.tolist()] == ["0", "0", "1", "2", "5", "5"]
    assert d.score.tolist() == pytest.approx(scores[:, 0].tolist())
    assert d.conf[1] < 0.52 and d.conf[3] > 0.9  # near an edge: unsure; a bin's centre region: sure


def test_regression_ramp_answers_a_bin_with_a_score_inside_it():
    head = Regression(["score"], [0, 1, 2])
    logits = torch.tensor([[0.0, 5.0, 4.9], [9.0, 0.0, 0.0]])
    d = head.decide_ramp(logits)
    assert d.answer.tolist() == [1, 0]
    assert 0.5 <= float(d.score[0]) < 1.5 and float(d.score[1]) < 0.5  # the expected value, kept inside its bin
    assert d.logits.shape == (2, 1)
    # soft targets peak at the head's bin, and split at an edge
    t = head.ramp_targets(torch.tensor([[1.0], [1.5]]), temperature=2.0)
    assert int(t[0].argmax()) == 1 and t[1, 1] == pytest.approx(float(t[1, 2]), rel=1e-5)


def test_regression_bins_must_be_increasing_and_edges_between_them():
    with pytest.raises(ValueError, match="increasing"):
        Regression(["s"], [0, 0])
    with pytest.raises(ValueError, match="separate"):
        Regression(["s"], [0, 1, 2], edges=[0.5, 2.5])


def test_multi_label_answer_is_the_label_set_and_confidence_the_least_certain_label():
    head = MultiLabel(["toxic", "spam", "ads"])
    logits = torch.tensor([[3.0, -3.0, 0.2], [-4.0, -4.0, -4.0]])
    d = head.decide(logits)
    assert d.answer.tolist() == [0b101, 0]
    assert head.label(5) == "toxic,ads" and head.label(0) == ""
    assert float(d.conf[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(0.2))))
    with pytest.raises(ValueError, match="bitmask"):
        MultiLabel([str(i) for i in range(63)])


def test_kind_follows_the_config_as_transformers_loss_does():
    from transformers import BertConfig

    assert kind_of_config(BertConfig(num_labels=3)) == "single_label"
    assert kind_of_config(BertConfig(num_labels=1)) == "regression"
    assert kind_of_config(BertConfig(num_labels=2, problem_type="multi_label_classification")) == "multi_label"
    reg = BertConfig(num_labels=1)
    head = head_from_scores(reg, torch.tensor([[0.1], [3.8]]))
    assert head.values == [0, 1, 2, 3, 4]
    assert head_kind(reg, head.to_dict()).values == head.values  # as recorded in a manifest
    with pytest.raises(ValueError, match="needs its bins"):
        head_kind(reg)
    with pytest.raises(ValueError, match="do not belong together"):
        head_kind(BertConfig(num_labels=3), {"kind": "multi_label"})
