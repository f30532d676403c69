"""Every model family on a tiny random classifier: stepping through its Backbone (embed -> layer_state -> layers ->
head) gives the transformers model's own logits, with every ramp closed and for the rows left after others exit
(fewer rows, trailing pad columns dropped); head kinds, compression, refusal, and bootstrap -> Predictor."""
import logging

import numpy as np
import pytest
import torch

from pipeline.compression import apply, make_config
from pipeline.engine.executor import execute
from pipeline.engine.policy import ExitPolicy
from pipeline.model.early_exit import EarlyExitModel
from pipeline.model.families import backbone, supported_classes
from pipeline.model.heads import head_from_scores
from pipeline.model.ramps import RampSet
from tests.tiny import DECODERS, FAMILIES, tiny_classifier

logging.getLogger("torchao").setLevel(logging.ERROR)

LAYERS = 4
ATOL = 1e-4
# rows of mixed lengths; row 0 is the only full-length one, rows 0-3 are the longest four (see _Scripted)
LENGTHS = [15, 14, 13, 12, 11, 9, 7, 5, 3, 2, 10, 6]


def _model(family, num_labels=3, problem_type=None, head=None, ramp_outputs=None):
    hf = tiny_classifier(family, num_layers=LAYERS, num_labels=num_labels, problem_type=problem_type)
    parts = backbone(hf)
    torch.manual_seed(1)
    ramps = RampSet(list(range(1, LAYERS)), parts.hidden_size, ramp_outputs or num_labels, parts.ramp_pooling)
    with torch.no_grad():  # decisive ramps: confidences spread, so a quantile threshold splits the rows
        for ramp in ramps.ramps:
            ramp.proj.weight.mul_(10)
    return EarlyExitModel(hf, ramps, head).eval()


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(LENGTHS)
    mask = (torch.arange(max(LENGTHS))[None, :] < lengths[:, None]).long()
    return torch.randint(5, 2000, mask.shape, generator=g) * mask, mask


@torch.inference_mode()
def _reference(m, ids, mask):
    return m.hf_model(input_ids=ids, attention_mask=mask).logits.float()


def _max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_ramp_closed_gives_the_models_own_logits(family):
    m = _model(family)
    ids, mask = _batch()
    ref = _reference(m, ids, mask)
    assert _max_diff(m.full_forward(ids, mask), ref) <= ATOL
    for mode in ("exit", "release"):
        out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), mode)
        assert _max_diff(out.logits, ref) <= ATOL, mode
        assert torch.equal(out.label, ref.argmax(-1)) and (out.exit_layer == LAYERS).all()


class _Scripted(ExitPolicy):
    """Rows leave by batch position: after layer 1 the first four rows (the longest, so the batch gets narrower),
    after layer 2 the first row left; nobody after layer 3."""

    def exits(self, r, conf):
        out = torch.zeros_like(conf, dtype=torch.bool)
        out[: {0: 4, 1: 1}.get(r, 0)] = True
        return out


def _record_shapes(m, monkeypatch):
    shapes = []
    inner = m.parts.layer_state

    def spy(hidden, mask):
        shapes.append(tuple(mask.shape))
        return inner(hidden, mask)

    monkeypatch.setattr(m.parts, "layer_state", spy)
    return shapes


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_that_stay_get_the_models_answer_after_others_leave(family, monkeypatch):
    """layer_state is recomputed for fewer rows and fewer columns; each row's result must not depend on that."""
    m = _model(family)
    ids, mask = _batch()
    ref = _reference(m, ids, mask)
    closed = ExitPolicy.closed(len(m.ramps))
    conf = execute(m, ids, mask, closed, "release").ramp_conf.numpy()
    shapes = _record_shapes(m, monkeypatch)

    # thresholds at a quantile of ramp confidence (as the tuner would open them)
    out = execute(m, ids, mask, ExitPolicy(np.nanquantile(conf, 0.75, axis=0)), "exit")
    stay = out.exit_layer == LAYERS
    assert 0 < int(stay.sum()) < len(LENGTHS), "the test needs some rows to exit and some not"
    assert _max_diff(out.logits[stay], ref[stay]) <= ATOL
    assert len(shapes) > 1 and shapes[-1][0] < len(LENGTHS)

    # the longest rows leave first: the rest run on a narrower batch, twice
    shapes.clear()
    out = execute(m, ids, mask, _Scripted(np.zeros(len(m.ramps))), "exit")
    stay = out.exit_layer == LAYERS
    assert shapes == [(12, 15), (8, 11), (7, 10)]
    assert _max_diff(out.logits[stay], ref[stay]) <= ATOL
    assert torch.equal(out.label[stay], ref[stay].argmax(-1))


@pytest.mark.parametrize("family", ["deberta_v2_conv", "modernbert_mean", "llama"])
def test_regression_head_answers_are_the_models_bins(family):
    probe = tiny_classifier(family, num_layers=LAYERS, num_labels=1)
    ids, mask = _batch()
    with torch.inference_mode():
        scores = probe(input_ids=ids, attention_mask=mask).logits.float()
    head = head_from_scores(probe.config, scores, bins=[float(v) for v in np.quantile(scores.numpy(), [0.2, 0.5, 0.8])])
    m = _model(family, num_labels=1, head=head, ramp_outputs=head.ramp_outputs)
    want = head.decide(_reference(m, ids, mask))
    for mode in ("exit", "release"):
        out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), mode)
        assert torch.equal(out.label, want.answer)
        torch.testing.assert_close(out.score, want.score, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["albert", "mpnet", "qwen2"])
def test_multi_label_head_answers_are_the_models_label_sets(family):
    m = _model(family, num_labels=4, problem_type="multi_label_classification")
    assert m.head_kind.kind == "multi_label"
    ids, mask = _batch()
    want = m.head_kind.decide(_reference(m, ids, mask))
    for mode in ("exit", "release"):
        out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), mode)
        assert torch.equal(out.label, want.answer)
        assert _max_diff(out.logits, want.logits) <= ATOL


def test_an_unsupported_class_is_refused_naming_the_supported_ones():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, pad_token_id=0))
    with pytest.raises(ValueError, match="GPT2ForSequenceClassification is not supported") as e:
        EarlyExitModel(gpt2, RampSet([1], 32, 2))
    for name in ("DebertaV2ForSequenceClassification", "ModernBertForSequenceClassification",
                 "LlamaForSequenceClassification", "Gemma3TextForSequenceClassification"):
        assert name in str(e.value) and name in supported_classes()


def test_decoders_pool_ramps_at_the_last_token_and_prefer_bf16():
    for family in FAMILIES:
        parts = backbone(tiny_classifier(family, num_layers=2))
        decoder = family in DECODERS
        assert parts.ramp_pooling == ("last" if decoder else "mean"), family
        assert parts.half_dtype == ("bfloat16" if decoder else "float16"), family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["bf16", "int8-dynamic"])
def test_compression_applies_to_every_family(family, method, monkeypatch):
    import torchao.quantization

    calls = []
    quantize = torchao.quantization.quantize_
    monkeypatch.setattr(torchao.quantization, "quantize_", lambda mod, cfg: calls.append(mod) or quantize(mod, cfg))
    m = _model(family)
    ids, mask = _batch()
    ref = _reference(m, ids, mask)
    apply(m, method, make_config(method, compile=False) if method == "int8-dynamic" else None)
    out = execute(m, ids, mask, ExitPolicy.closed(len(m.ramps)), "exit")
    assert torch.isfinite(out.logits).all() and (out.label >= 0).all()
    assert out.logits.shape == ref.shape
    if method == "int8-dynamic":
        # each distinct module once: ALBERT's shared group is quantized once however many times it is applied
        assert len(calls) == len(m.parts.modules) and all(any(c is mod for c in calls) for mod in m.parts.modules)
        linear = next(x for x in m.parts.layers[-1].modules() if isinstance(x, torch.nn.Linear))
        assert type(linear.weight).__name__ == "Int8Tensor"
    else:
        assert next(m.parts.layers[0].parameters()).dtype == torch.bfloat16


def test_modernbert_runs_the_padded_attention_path():
    m = tiny_classifier("modernbert", num_layers=2)
    m.set_attn_implementation("flex_attention")  # as a checkpoint loaded for flash / flex kernels would be
    backbone(m)
    assert m.config._attn_implementation == "sdpa"


def test_albert_steps_through_one_shared_group():
    parts = backbone(tiny_classifier("albert", num_layers=LAYERS))
    assert len(parts.modules) == 1 and parts.num_layers == LAYERS
    assert all(layer is parts.modules[0] for layer in parts.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_bootstrap_then_predict_one_answer_per_text(family, tmp_path):
    from pipeline.config import BootstrapConfig
    from pipeline.engine.predictor import Predictor
    from pipeline.training.bootstrap import bootstrap
    from tests.tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model", family, num_layers=3)
    manifest = bootstrap(model_dir, str(tmp_path / "ee"), BootstrapConfig(limit=60, epochs=2))
    assert manifest.num_layers == 3 and manifest.family == backbone(tiny_classifier(family, 3)).family
    assert {r.pooling for r in manifest.ramps} == {"last" if family in DECODERS else "mean"}
    texts = ["a fine film", "dull and far too long, with a plot that goes nowhere at all", "ok", "great fun"]
    preds = Predictor(str(tmp_path / "ee")).predict(texts).predictions
    assert len(preds) == len(texts)
    assert all(p.error is None and p.label in ("class0", "class1") for p in preds)
