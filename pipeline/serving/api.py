"""The HTTP contract of POST /predict: parsing, validation and response shapes (no Serve, no model).

Request (the shape of Hugging Face text-embeddings-inference's /predict):
    {"inputs": "text"}                      one text
    {"inputs": ["t1", "t2", ...]}           a batch (TEI would read a 2-item flat list as a text pair;
                                            offramp has no pair models, so a flat list is a batch)
    {"inputs": [["t1"], ["t2"], ...]}       TEI's batch form, also accepted
    optional "truncate": true (default; over-long texts are cut to the model's maximum) | false (422
    instead), "raw_scores": false (true is refused: offramp returns probabilities).

Response 200 (TEI's shape, the predicted class only, plus where the answer came from):
    one text:  [{"label": "positive", "score": 0.97, "exit_layer": 2}]
    a batch:   [[{"label": ..., "score": ..., "exit_layer": ...}], [{...}], ...]   (input order)
`score` is the softmax probability of `label` at the ramp (or head) that answered; `exit_layer` is the
number of encoder layers run before the answer (L = the original model's head).

Errors: {"error": "<what is wrong and how to fix it>", "error_type": "<Validation|Overloaded|Backend>"}
    400 invalid JSON / not an object; 413 body too large; 422 bad `inputs` (missing, empty, not strings,
    too many, too long with truncate=false); 503 queue full (Retry-After header); 500 the batch failed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.data.texts import validate_text

__all__ = ["ApiError", "PredictRequest", "error_body", "parse_predict_request", "prediction_body"]

_KNOWN = {"inputs", "truncate", "raw_scores"}


class ApiError(Exception):
    """A request the endpoint refuses: HTTP status, TEI-style error type, message."""

    def __init__(self, status: int, message: str, error_type: str = "Validation", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}


@dataclass
class PredictRequest:
    texts: list[str]
    single: bool
    """True when `inputs` was one string: the response is then one list, not a list of lists."""
    truncate: bool = True


def error_body(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def parse_predict_request(body: bytes, max_items: int, max_body_bytes: int) -> PredictRequest:
    """Raise ApiError with a message that says what is wrong; return the texts otherwise."""
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_body_bytes} "
                            "(batching.max_body_bytes): send fewer or shorter texts per request")
    if not body.strip():
        raise ApiError(400, 'empty request body; send JSON like {"inputs": "some text"}')
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f'request body is not valid JSON ({e}); send {{"inputs": "some text"}}') from None
    if not isinstance(data, dict):
        raise ApiError(400, 'request body must be a JSON object like {"inputs": "some text"}, '
                            f"got {type(data).__name__}")
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown}; known fields: {sorted(_KNOWN)}")
    if "inputs" not in data:
        raise ApiError(422, 'missing "inputs": send {"inputs": "some text"} or {"inputs": ["text 1", "text 2"]}')
    truncate = data.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ApiError(422, f'"truncate" must be true or false, got {truncate!r}')
    if data.get("raw_scores", False) is not False:
        raise ApiError(422, '"raw_scores": true is not supported; offramp returns the probability of the '
                            "predicted label")
    inputs = data["inputs"]
    if isinstance(inputs, str):
        texts, single = [inputs], True
    elif isinstance(inputs, list):
        if not inputs:
            raise ApiError(422, '"inputs" is an empty list; send at least one text')
        texts, single = [_one_text(x, i) for i, x in enumerate(inputs)], False
    else:
        raise ApiError(422, f'"inputs" must be a string or a list of strings, got {_kind(inputs)}')
    if len(texts) > max_items:
        raise ApiError(422, f'"inputs" has {len(texts)} texts; the limit is {max_items} per request '
                            "(batching.max_items_per_request): split it into several requests")
    for i, t in enumerate(texts):
        why = validate_text(t)
        if why:
            where = '"inputs"' if single else f'"inputs"[{i}]'
            raise ApiError(422, f"{where}: {why}")
    return PredictRequest(texts, single, truncate)


def _one_text(x, i: int):
    if isinstance(x, str):
        return x
    if isinstance(x, list) and len(x) == 1 and isinstance(x[0], str):
        return x[0]  # TEI's batch form [["t1"], ["t2"]]
    if isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x):
        raise ApiError(422, f'"inputs"[{i}] is a text pair; offramp classifies single texts only')
    raise ApiError(422, f'"inputs"[{i}] is {_kind(x)}, not a string; send strings only')


def _kind(x) -> str:
    names = {type(None): "null", dict: "an object", list: "a list", bool: "a boolean", int: "an integer",
             float: "a number"}
    return names.get(type(x), f"a {type(x).__name__}")


def prediction_body(predictions, single: bool) -> list:
    """TEI-shaped JSON for answered predictions (callers check `error` first)."""
    rows = [[{"label": p.label, "score": round(float(p.score), 6), "exit_layer": int(p.exit_layer)}]
            for p in predictions]
    return rows[0] if single else rows
