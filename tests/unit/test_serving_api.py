"""The /predict contract without a server: TEI's text-classification requests and responses, errors with
TEI's status codes and a clear message, every label's score from the head that answered."""
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import EngineConfig
from pipeline.engine.predictor import Prediction, Predictor
from pipeline.serving.api import ApiError, label_scores, parse_predict_request, prediction_body
from pipeline.serving.config import BatchingSettings, ServeAppConfig


def parse(obj, max_items=4, max_body=1000, raw=None):
    body = raw if raw is not None else json.dumps(obj).encode()
    return parse_predict_request(body, max_items, max_body)


def test_tei_input_forms():
    r = parse({"inputs": "great film"})
    assert r.texts == ["great film"] and r.single and r.truncate is None and r.transform is None
    r = parse({"inputs": ["great film"]})  # TEI: a one-string list is one text, answered unnested
    assert r.texts == ["great film"] and r.single
    r = parse({"inputs": [["a"], ["b"]], "truncate": False, "raw_scores": False, "truncation_direction": "Left"})
    assert r.texts == ["a", "b"] and not r.single and r.truncate is False and r.truncation_direction == "left"
    assert parse({"inputs": "a", "raw_scores": True}).transform == "none"
    assert parse({"inputs": "a", "truncate": None, "truncation_direction": "right"}).truncation_direction == "right"


def test_huggingface_hub_parameters_and_unknown_fields():
    # what InferenceClient.text_classification sends: parameters with None values dropped
    r = parse({"inputs": "a", "parameters": {}})
    assert (r.transform, r.top_k) == (None, None)  # None: the head's own (softmax for a single-label head)
    r = parse({"inputs": "a", "parameters": {"top_k": 1, "function_to_apply": "sigmoid", "other": 3}})
    assert (r.transform, r.top_k) == ("sigmoid", 1)
    assert parse({"inputs": "a", "parameters": {"function_to_apply": "none"}}).transform == "none"
    r = parse({"inputs": "a", "input": "typo", "normalize": True, "model": "x"})  # ignored, as TEI ignores them
    assert r.texts == ["a"]


@pytest.mark.parametrize("obj,status,error_type,words", [
    ({}, 422, "Validation", 'missing "inputs"'),
    ({"inputs": ""}, 400, "Empty", "empty"),
    ({"inputs": "   "}, 400, "Empty", "empty"),
    ({"inputs": [["ok"], [""]]}, 400, "Empty", '"inputs"[1]: text is empty'),
    ({"inputs": []}, 422, "Validation", "empty list"),
    ({"inputs": None}, 422, "Validation", "got null"),
    ({"inputs": 3}, 422, "Validation", "got an integer"),
    ({"inputs": ["a", "b"]}, 422, "Validation", "text pair"),
    ({"inputs": [["a", "b"]]}, 422, "Validation", '"inputs"[0] is a text pair'),
    ({"inputs": ["a", "b", "c"]}, 422, "Validation", '[["text 1"], ["text 2"], ...]'),
    ({"inputs": ["ok", 3]}, 422, "Validation", "mixes strings and an integer"),
    ({"inputs": [["ok"], 3]}, 422, "Validation", '"inputs"[1] is an integer'),
    ({"inputs": [["ok"], [{"t": 1}]]}, 422, "Validation", '"inputs"[1] is a list'),
    ({"inputs": [["a"]] * 5}, 422, "Validation", "batch size 5 > maximum allowed batch size 4"),
    ({"inputs": "a", "raw_scores": "yes"}, 422, "Validation", "raw_scores"),
    ({"inputs": "a", "truncate": "yes"}, 422, "Validation", "truncate"),
    ({"inputs": "a", "truncation_direction": "Up"}, 422, "Validation", "truncation_direction"),
    ({"inputs": "a", "parameters": {"top_k": 0}}, 422, "Validation", "top_k"),
    ({"inputs": "a", "parameters": {"function_to_apply": "relu"}}, 422, "Validation", "function_to_apply"),
    ({"inputs": "a", "parameters": [1]}, 422, "Validation", '"parameters" must be an object'),
    (["a"], 422, "Validation", "JSON object"),
    ({"inputs": "\ud800"}, 400, "Validation", "lone surrogate"),
])
def test_bad_requests_get_tei_status_and_a_message(obj, status, error_type, words):
    with pytest.raises(ApiError) as e:
        parse(obj)
    assert (e.value.status, e.value.error_type) == (status, error_type)
    assert words in e.value.message


def test_invalid_json_non_utf8_empty_and_oversized_bodies():
    for raw, words in [(b'{"inputs": "unterminated', "not valid JSON"), (b'{"inputs": "\xff\xfe"}', "not UTF-8"),
                       (b"\xff\xfe{\x00", "not UTF-8"), (b"", "empty request body"), (b"  \n", "empty request body")]:
        with pytest.raises(ApiError) as e:
            parse(None, raw=raw)
        assert e.value.status == 400 and words in e.value.message, raw
    with pytest.raises(ApiError) as e:
        parse({"inputs": "x" * 2000})
    assert e.value.status == 413 and "max_body_bytes" in e.value.message


def test_every_label_sorted_by_score_with_offramp_keys_on_the_top_entry():
    logits = np.array([0.5, 2.0, -1.0], np.float32)
    labels = ["neg", "pos", "mixed"]
    rows = label_scores(logits, labels, top={"exit_layer": 2})
    assert [r["label"] for r in rows] == ["pos", "neg", "mixed"]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert [r["score"] for r in rows] == pytest.approx([probs[1], probs[0], probs[2]])
    assert rows[0]["exit_layer"] == 2 and all(set(r) == {"label", "score"} for r in rows[1:])
    assert [r["score"] for r in label_scores(logits, labels, "none")] == pytest.approx([2.0, 0.5, -1.0])
    sigmoid = label_scores(logits, labels, "sigmoid", top_k=1)
    assert sigmoid == [{"label": "pos", "score": pytest.approx(1 / (1 + np.exp(-2)))}]
    tie = label_scores(np.zeros(2, np.float32), ["a", "b"])
    assert [r["label"] for r in tie] == ["a", "b"]  # as argmax picks


def test_response_shapes_follow_tei_and_agree_with_the_engine(tiny_artifact):
    """The top-ranked entry is the engine's answer (label, and its score up to float rounding), whether a
    ramp or the original head answered; a batch is a list of such lists, in input order."""
    texts = ["a fine film", "dull", "one of the best movies of the year, truly moving", "meh"]
    p = Predictor(tiny_artifact, EngineConfig(mode="release"))
    half = Predictor(tiny_artifact, EngineConfig(mode="release", thresholds=[0.0, 1.0, 1.0]))  # ramp 1 answers all
    for pred in (p, half):
        preds = pred.predict(texts).predictions
        req = parse({"inputs": [[t] for t in texts]})
        body = prediction_body(preds, pred.label_names, req)
        assert len(body) == len(texts)
        for rows, want in zip(body, preds):
            assert len(rows) == len(pred.label_names) and rows[0]["label"] == want.label
            assert rows[0]["score"] == pytest.approx(want.score, abs=1e-5)
            assert rows[0]["exit_layer"] == want.exit_layer and rows[0]["threshold_version"] == pred.policy.version
            assert sum(r["score"] for r in rows) == pytest.approx(1.0, abs=1e-6)
            assert rows == sorted(rows, key=lambda r: -r["score"])
    assert {pr.exit_layer for pr in half.predict(texts).predictions} == {1}
    one = prediction_body(p.predict(texts[:1]).predictions, p.label_names, parse({"inputs": texts[0]}))
    assert isinstance(one, list) and isinstance(one[0], dict)  # one text: one list, unnested (TEI's Single)
    bare = Prediction("x", 0, 0.9, 1)  # a custom predictor_class without logits: the predicted label only
    assert prediction_body([bare], ["x", "y"], parse({"inputs": "a"})) == [
        {"label": "x", "score": 0.9, "exit_layer": 1, "threshold_version": None}]
    assert Prediction("x", 0, 0.9, 1).to_dict() == {"label": "x", "label_id": 0, "score": 0.9, "exit_layer": 1,
                                                   "truncated": False, "error": None, "threshold_version": None}


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_items_per_request=300 exceeds max_queue=256"):
        BatchingSettings(max_items_per_request=300)
    with pytest.raises(ValueError, match="max_batch_sise"):
        ServeAppConfig(model="m", batching={"max_batch_sise": 3})


def test_shipped_serve_configs_are_valid_ray_serve_files_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    from pipeline.config import load_yaml

    files = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "serve").glob("*.yaml"))
    assert files
    for f in files:
        data = load_yaml(f)
        schema = ServeDeploySchema.model_validate(data)
        assert schema.http_options.host == "127.0.0.1", f
        for app in schema.applications:
            assert app.import_path == "pipeline.serving.app:app_builder"
            cfg = ServeAppConfig.model_validate(app.args)
            assert cfg.engine.mode == "release"
            for d in app.deployments:
                opts = d.model_dump(exclude_unset=True)
                assert not ("num_replicas" in opts and "autoscaling_config" in opts)  # exclusive in Serve
                if "max_ongoing_requests" in opts:
                    assert opts["max_ongoing_requests"] >= cfg.batching.max_queue
