"""The /predict contract without a server: TEI-shaped requests and responses, 4xx with a clear message."""
import json
from pathlib import Path

import pytest

from pipeline.engine.predictor import Prediction
from pipeline.serving.api import ApiError, parse_predict_request, prediction_body
from pipeline.serving.config import BatchingSettings, ServeAppConfig


def parse(obj, max_items=4, max_body=1000, raw=None):
    body = raw if raw is not None else json.dumps(obj).encode()
    return parse_predict_request(body, max_items, max_body)


def test_single_text_batch_and_tei_batch_form():
    r = parse({"inputs": "great film"})
    assert r.texts == ["great film"] and r.single and r.truncate
    r = parse({"inputs": ["a", "b"]})
    assert r.texts == ["a", "b"] and not r.single
    r = parse({"inputs": [["a"], ["b"]], "truncate": False, "raw_scores": False})
    assert r.texts == ["a", "b"] and not r.truncate


@pytest.mark.parametrize("obj,status,words", [
    ({}, 422, 'missing "inputs"'),
    ({"inputs": ""}, 422, "empty"),
    ({"inputs": "   "}, 422, "empty"),
    ({"inputs": []}, 422, "empty list"),
    ({"inputs": None}, 422, "got null"),
    ({"inputs": 3}, 422, "got an integer"),
    ({"inputs": ["ok", 3]}, 422, '"inputs"[1] is an integer'),
    ({"inputs": ["ok", {"t": 1}]}, 422, "an object"),
    ({"inputs": ["ok", ""]}, 422, '"inputs"[1]: text is empty'),
    ({"inputs": [["a", "b"]]}, 422, "text pair"),
    ({"inputs": ["a"] * 5}, 422, "limit is 4"),
    ({"inputs": "a", "raw_scores": True}, 422, "raw_scores"),
    ({"inputs": "a", "truncate": "yes"}, 422, "truncate"),
    ({"inputs": "a", "input": "typo"}, 422, "unknown field"),
    (["a"], 400, "JSON object"),
])
def test_bad_requests_name_what_is_wrong(obj, status, words):
    with pytest.raises(ApiError) as e:
        parse(obj)
    assert e.value.status == status
    assert words in e.value.message


def test_invalid_json_and_oversized_bodies():
    with pytest.raises(ApiError) as e:
        parse(None, raw=b'{"inputs": "unterminated')
    assert e.value.status == 400 and "not valid JSON" in e.value.message
    with pytest.raises(ApiError) as e:
        parse(None, raw=b"\xff\xfe")
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        parse(None, raw=b"")
    assert e.value.status == 400
    with pytest.raises(ApiError) as e:
        parse({"inputs": "x" * 2000})
    assert e.value.status == 413 and "max_body_bytes" in e.value.message


def test_response_shapes_follow_tei():
    p = [Prediction("positive", 1, 0.91234567, 2), Prediction("negative", 0, 0.8, 6)]
    assert prediction_body(p[:1], single=True) == [{"label": "positive", "score": 0.912346, "exit_layer": 2}]
    assert prediction_body(p, single=False) == [
        [{"label": "positive", "score": 0.912346, "exit_layer": 2}],
        [{"label": "negative", "score": 0.8, "exit_layer": 6}],
    ]


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
