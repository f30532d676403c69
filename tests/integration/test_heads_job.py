"""Regression and multi-label heads through the user flow on a real local Ray: bootstrap, a certified job and
`offramp verify` agree on what agreement is (the same integer bin; the same label set), checked against the plain
transformers model's outputs turned into bins / sets here; and Serve answers a regression over HTTP (TEI shape:
the raw score as `score`, offramp's `answer`).

The tiny random models' heads are rescaled so their answers spread (scores over 0-5, sigmoids on both sides of 0.5).
The jobs open one ramp by hand at its median confidence (no calibration: with a tiny model the race between the
calibration sample and the bulk decides how many rows exit, and this test wants some) and audit every bulk row, so
the certificate's agreement is exact and must equal the truth."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import torch
import yaml

from pipeline.config import BootstrapConfig, EngineConfig
from pipeline.data.datasets import load_dataset
from pipeline.engine.predictor import Predictor
from pipeline.offline.job import run_job
from pipeline.offline.verify import verify
from tests.integration.test_offline_job import _cfg, _read_output
from tests.integration.test_serve import _free_port

ROWS = 400
LAYERS = 4
TAGS = ["tag0", "tag1", "tag2"]


def _texts(n: int = ROWS) -> list[str]:
    return load_dataset("movie-reviews").split("test").texts[:n]


def _save_head_model(path, problem_type: str) -> str:
    """A tiny random BERT with a regression (one output) or multi-label (3 tags) head whose outputs spread: weights
    at 10x the usual init (at the usual one, every text gets nearly the same output), then the head's scaled so a
    regression scores ~2.5 +- 1.3 and each tag's logit is ~0 +- 2 on movie reviews."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.model.artifact import load_tokenizer
    from tests.tiny import _config

    regression = problem_type == "regression"
    names = ["score"] if regression else TAGS
    config = _config("bert", LAYERS, len(names))
    config.initializer_range, config.problem_type = 0.2, problem_type
    config.id2label, config.label2id = dict(enumerate(names)), {n: i for i, n in enumerate(names)}
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    tok = load_tokenizer("minilm-l6")
    with torch.no_grad():
        wh = model(**tok(_texts(300), padding=True, return_tensors="pt")).logits - model.classifier.bias
        scale = (1.3 if regression else 2.0) / wh.std(0)
        model.classifier.weight.mul_(scale[:, None])
        model.classifier.bias.copy_((2.5 if regression else 0.0) - scale * wh.mean(0))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def head_artifacts(tmp_path_factory) -> dict[str, str]:
    out = {}
    for problem, bins in (("regression", [0, 1, 2, 3, 4, 5]), ("multi_label_classification", None)):
        root = tmp_path_factory.mktemp(problem)
        from pipeline.training.bootstrap import bootstrap

        manifest = bootstrap(_save_head_model(root / "model", problem), str(root / "ee"),
                             BootstrapConfig(limit=300, epochs=5, regression_bins=bins))
        assert manifest.head["kind"] == {"regression": "regression"}.get(problem, "multi_label")
        out[problem] = str(root / "ee")
    return out


def _truth(artifact: str, texts: list[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(answer ids, answer labels, raw logits [N,C]) of the artifact's original model run plainly by transformers,
    turned into answers here from the manifest's head: a regression's bin (edges[k-1] <= score < edges[k]), a
    multi-label set (sigmoid >= 0.5) as a bitmask."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(f"{artifact}/model").eval()
    tok = AutoTokenizer.from_pretrained(f"{artifact}/model")
    with torch.no_grad():
        logits = torch.cat([model(**tok(texts[i:i + 64], padding=True, truncation=True, max_length=128,
                                        return_tensors="pt")).logits for i in range(0, len(texts), 64)]).numpy()
    head = json.loads(open(f"{artifact}/manifest.json").read())["head"]
    if head["kind"] == "regression":
        bins = np.searchsorted(np.asarray(head["edges"]), logits[:, 0], side="right")
        return bins, [str(int(head["values"][b])) for b in bins], logits
    on = 1 / (1 + np.exp(-logits)) >= 0.5
    return (on * (1 << np.arange(len(TAGS)))).sum(1), [",".join(t for t, o in zip(TAGS, row) if o) for row in on], logits


def _median_threshold(artifact: str, texts: list[str], ramp: int = 1) -> list[float]:
    """Thresholds with one ramp (0-based `ramp`) open at its median confidence: about half the rows exit there."""
    p = Predictor(artifact, EngineConfig(mode="release", thresholds=[1.0] * (LAYERS - 1), dtype="float32"))
    out = p.predict(texts)
    thresholds = [1.0] * (LAYERS - 1)
    thresholds[ramp] = float(np.median(out.feedback.conf[:, ramp]))
    return thresholds


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_certified_job_and_verify_measure_the_heads_own_agreement(ray_session, head_artifacts, tmp_path, problem):
    artifact = head_artifacts[problem]
    texts = _texts()
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"rid": [f"r{i}" for i in range(ROWS)], "text": texts}), tmp_path / "in" / "a.parquet")
    thresholds = _median_threshold(artifact, texts)
    cfg = _cfg(artifact, tmp_path / "in", tmp_path / "out", input={"passthrough": []}, controller={"enabled": False},
               engine={"thresholds": thresholds, "dtype": "float32"}, output={"probabilities": True},
               certify={"enabled": True, "calibrate": False, "audit_fraction": 1.0, "max_audit_fraction": 1.0,
                        "top_up": False, "on_uncertified": "warn"})
    cert = run_job(cfg, echo=lambda *_: None)["certificate"]
    truth, truth_labels, logits = _truth(artifact, texts)
    rows = {r["id"]: r for r in _read_output(tmp_path / "out")}
    assert len(rows) == ROWS
    got = np.array([rows[f"r{i}"]["label_id"] for i in range(ROWS)])
    layer = np.array([rows[f"r{i}"]["exit_layer"] for i in range(ROWS)])
    labels = [rows[f"r{i}"]["label"] for i in range(ROWS)]
    full, early = layer == LAYERS, layer == 2
    assert (full | early).all() and full.sum() > 50 and early.sum() > 50
    # rows the original head answered: its answer, as this test computes it from the plain model
    assert (got[full] == truth[full]).all() and [labels[i] for i in np.flatnonzero(full)] == [
        truth_labels[i] for i in np.flatnonzero(full)]
    wrong = int((got[early] != truth[early]).sum())
    assert wrong > 0  # a tiny random model's ramp: the comparison below is not a trivial 100%

    # the certificate: every bulk row audited, so its disagreements are the early rows' true ones (same bin / set)
    assert cert["rows"] == cert["answered"] == ROWS and cert["early"] == int(early.sum())
    assert cert["audit_early"] == cert["early"] and cert["audit_early_disagree"] == wrong
    assert cert["agreement"] == pytest.approx(1 - wrong / ROWS)
    lo, hi = cert["interval"]
    assert lo - 1e-9 <= 1 - wrong / ROWS <= hi + 1e-9

    report = verify(str(tmp_path / "out"), echo=lambda *_: None)
    assert report["rows_checked"] == ROWS and report["disagreements"] == wrong
    assert report["agreement"] == pytest.approx(1 - wrong / ROWS) and report["claim_interval_contains_truth"]
    assert report["per_exit_layer"][str(LAYERS)]["agreement"] == 1.0

    table = pq.read_table(str(tmp_path / "out"))
    score = {r: s for r, s in zip(table.column("id").to_pylist(), table.column("score").to_pylist())}
    if problem == "regression":
        assert not [c for c in table.column_names if c.startswith("prob_")]  # the raw score is `score` already
        manifest = json.loads(open(f"{artifact}/manifest.json").read())["head"]
        edges = [-np.inf, *manifest["edges"], np.inf]
        for i in range(ROWS):
            k = manifest["values"].index(float(labels[i]))
            assert edges[k] <= score[f"r{i}"] < edges[k + 1]  # a ramp's score stays inside the bin it answered
            if full[i]:
                assert score[f"r{i}"] == pytest.approx(float(logits[i, 0]), abs=1e-4)
    else:
        probs = {t: dict(zip(table.column("id").to_pylist(), table.column(f"prob_{t}").to_pylist())) for t in TAGS}
        for i in range(ROWS):  # sigmoid per tag, the answer's tags those at 0.5 or more
            on = {t for t in TAGS if probs[t][f"r{i}"] >= 0.5}
            assert on == (set(labels[i].split(",")) - {""})


@pytest.fixture(scope="module")
def regression_app(ray_session, head_artifacts, tmp_path_factory):
    from ray import serve

    from pipeline.commands.serve import deploy

    artifact = head_artifacts["regression"]
    thresholds = _median_threshold(artifact, _texts(100))
    config = {
        "http_options": {"port": _free_port()},
        "applications": [{
            "name": "regression", "route_prefix": "/regression", "import_path": "pipeline.serving.app:app_builder",
            "args": {"model": artifact, "engine": {"thresholds": thresholds, "dtype": "float32"},
                     "controller": {"enabled": False}},
            "deployments": [{"name": "EarlyExitDeployment", "num_replicas": 1, "max_ongoing_requests": 16,
                             "ray_actor_options": {"num_cpus": 0.25}}],
        }],
    }
    path = tmp_path_factory.mktemp("serve-regression") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    (url,) = deploy(str(path), timeout_s=180, echo=lambda *_: None)
    yield {"url": url, "artifact": artifact, "thresholds": thresholds}
    serve.shutdown()


def test_serve_answers_a_regression_with_its_raw_score_and_bin(regression_app):
    texts = _texts(24)
    local = Predictor(regression_app["artifact"],
                      EngineConfig(mode="release", thresholds=regression_app["thresholds"], dtype="float32"))
    want = local.predict(texts).predictions
    r = requests.post(f"{regression_app['url']}/predict", json={"inputs": [[t] for t in texts]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == len(texts) and {p.exit_layer for p in want} == {2, LAYERS}  # ramp and head answers
    for got, p in zip(body, want):
        assert len(got) == 1  # one output: the raw score, under the head's label name (TEI's shape)
        (top,) = got
        assert top["label"] == "score" and top["score"] == pytest.approx(p.score, abs=1e-4)
        assert top["answer"] == p.label and top["exit_layer"] == p.exit_layer
        assert float(top["answer"]) == float(np.clip(np.floor(top["score"] + 0.5), 0, 5))  # the score's integer bin
    single = requests.post(f"{regression_app['url']}/predict", json={"inputs": texts[0]}, timeout=60).json()
    assert single[0]["answer"] == want[0].label  # a single input: one list of labels
    info = requests.get(f"{regression_app['url']}/info", timeout=30).json()
    assert info["model_type"]["classifier"]["id2label"] == {"0": "score"}
