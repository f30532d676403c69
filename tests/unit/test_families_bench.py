"""`offramp bench families`' pure parts: the random-weight model directories it fine-tunes, and its table."""
import pytest
import torch

from pipeline.bench.families_bench import FAMILIES, build_model_dir, format_table, model_config
from pipeline.bench.report import headlines
from pipeline.model.artifact import load_classifier, load_tokenizer
from pipeline.model.families import backbone, supported_classes


def test_every_family_has_a_supported_config():
    for family in FAMILIES:
        cfg = model_config(family, layers=2, hidden=64)
        assert f"{type(cfg).__name__.removesuffix('Config')}ForSequenceClassification".lower() in {
            c.lower() for c in supported_classes()}, family
        assert cfg.pad_token_id == 0 and cfg.num_labels == 2  # decoders find each row's last token by the pad id


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_model_dir_loads_as_a_classifier_offramp_steps_through(tmp_path, family):
    path = build_model_dir(tmp_path / family, family, layers=2, hidden=64)
    model, tok = load_classifier(path).eval(), load_tokenizer(path)
    parts = backbone(model)
    assert parts.num_layers == 2 and parts.hidden_size == 64 and len(tok) == model.config.vocab_size
    enc = tok(["a moving film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    with torch.no_grad():  # the padded row answers as it does alone: the pad id is the tokenizer's
        alone = model(**tok(["dull"], return_tensors="pt")).logits
    assert torch.allclose(logits[1], alone[0], atol=1e-4)


def _row(**kw):
    row = {"family": "llama", "transformers_class": "LlamaForSequenceClassification", "layers": 6, "hidden": 128,
           "ramps": 5, "test_accuracy": 0.6512, "seconds_per_step": 0.251, "precision": "bfloat16",
           "layer_compute_saved": 0.3121, "layer_compute_saved_actual": 0.2804, "claimed": 0.9952,
           "claimed_interval": [0.9931, 0.9968], "certified": True, "answer_with": "model",
           "true_agreement": 0.9949, "disagreements": 54, "interval_contains_truth": True, "rows": 10568}
    return {**row, **kw}


def test_table_renders_a_row_and_the_report_its_headline():
    table = format_table([_row(), _row(family="bert", layer_compute_saved=0.1, true_agreement=0.991,
                                       interval_contains_truth=False)])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert ("| llama | LlamaForSequenceClassification | 6 x 128 | 5 | 0.651 | 0.25 | bfloat16 | 31.21% / 28.04% | "
            "99.52% [99.31%, 99.68%] | yes | 99.49% (54 disagreements) | yes |") == lines[2]
    assert lines[3].endswith("| NO |")
    [h] = headlines({"layers": 6, "hidden": 128, "results": [_row(), _row(family="bert", layer_compute_saved=0.1,
                                                                            true_agreement=0.991)], "failures": {}})
    assert "10.00% to 31.21%" in h["offramp"] and "2/2 certified" in h["accuracy"] and "99.10% (bert)" in h["accuracy"]
