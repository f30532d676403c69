"""The HTTP contract of POST /predict (and POST /): Hugging Face text-embeddings-inference's (TEI) text
classification protocol, so TEI clients (`huggingface_hub.InferenceClient`, requests, curl, load balancers)
work unchanged. Parsing, validation, response and error shapes; no Serve, no model. docs/tei.md has the
full comparison with TEI (router/src/http/{server,types}.rs).

Request (TEI's PredictRequest; unknown fields are ignored, as TEI's serde ignores them):
    {"inputs": "text"}                      one text
    {"inputs": ["text"]}                    one text (TEI reads a flat list as one text or a text pair)
    {"inputs": [["t1"], ["t2"], ...]}       a batch
    {"inputs": ["t1", "t2"]}, [["t1", "t2"]]  a text pair: 422 (offramp classifies single texts)
    "truncate": true|false|null (null = the server's default: cut to the model's maximum), "truncation_direction":
    "Right"|"Left" (default: the tokenizer's side), "raw_scores": false|true (the raw logits),
    "parameters": {"top_k": k, "function_to_apply": "softmax"|"sigmoid"|"none"} (what huggingface_hub sends).

Response 200, per text every label sorted by score (from the ramp or head that answered: softmax probabilities
of a single-label head, a sigmoid per label of a multi-label head, a regression's score):
    one text:  [{"label": "positive", "score": 0.97, "exit_layer": 2, "threshold_version": 3},
                {"label": "negative", "score": 0.03}]
    a batch:   [[{...}, {...}], [{...}, {...}], ...]   (input order)
offramp's own keys (`exit_layer`: encoder layers run before the answer, L = the original head;
`threshold_version`; for a regression or multi-label head `answer`, the bin or the label set that agreement is
measured on) ride on the top-ranked entry only, where TEI clients ignore them.

Errors, TEI's shape and status codes: {"error": "<what is wrong and how to fix it>", "error_type": ...}
    400 Validation: empty body, invalid JSON or UTF-8;   400 Empty: an empty text;
    413 Validation: body too large;   422 Validation: bad fields, a pair, too many texts, too long without truncation;
    429 Overloaded (+ Retry-After): queue full;   424 Backend: the batch failed;   503 Unhealthy: GET /health.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

__all__ = ["ApiError", "PredictRequest", "error_body", "info_body", "label_scores", "parse_predict_request",
           "prediction_body"]

log = logging.getLogger(__name__)

_FIELDS = {"inputs", "truncate", "truncation_direction", "raw_scores", "parameters"}
_DIRECTIONS = {"right": "right", "left": "left"}  # TEI's serde aliases: Right/right, Left/left
_TRANSFORMS = ("softmax", "sigmoid", "none")
_EXAMPLE = '{"inputs": "some text"} or {"inputs": [["text 1"], ["text 2"]]}'


class ApiError(Exception):
    """A request the endpoint refuses: HTTP status, TEI error type, message."""

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
    """True when `inputs` was one text: the response is then one list of labels, not a list of lists."""
    truncate: bool | None = None
    """None: the server's default (auto-truncate, as TEI's --auto-truncate default)."""
    truncation_direction: str | None = None
    """'right' | 'left', or None: the tokenizer's own truncation side."""
    transform: str | None = None
    """softmax | sigmoid | none (raw logits), or None: the head's own (pipeline.model.heads.HeadKind.transform)."""
    top_k: int | None = None


def error_body(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def parse_predict_request(body: bytes, max_items: int, max_body_bytes: int) -> PredictRequest:
    """Raise ApiError with a message that says what is wrong; return the request otherwise."""
    if len(body) > max_body_bytes:
        raise ApiError(413, f"request body is {len(body)} bytes; the limit is {max_body_bytes} "
                            "(batching.max_body_bytes): send fewer or shorter texts per request")
    try:
        text = body.decode("utf-8")  # json.loads(bytes) would guess UTF-16/32 from the first bytes
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 ({e}); send UTF-8 JSON like {_EXAMPLE}") from None
    if not text.strip():
        raise ApiError(400, f"empty request body; send JSON like {_EXAMPLE}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"request body is not valid JSON ({e}); send {_EXAMPLE}") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"request body must be a JSON object like {_EXAMPLE}, got {_kind(data)}")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:  # TEI ignores them too; a typo shows up in the debug log
        log.debug("ignoring unknown request field(s) %s", unknown)
    if "inputs" not in data:
        raise ApiError(422, f'missing "inputs": send {_EXAMPLE}')
    texts, single = _inputs(data["inputs"])
    if len(texts) > max_items:
        raise ApiError(422, f"batch size {len(texts)} > maximum allowed batch size {max_items} "
                            "(batching.max_items_per_request): split it into several requests")
    for i, t in enumerate(texts):
        where = '"inputs"' if single else f'"inputs"[{i}]'
        if not t.strip():  # TEI: 400 Empty ("`inputs` cannot be empty")
            raise ApiError(400, f"{where}: text is empty or whitespace only; send a non-empty string", "Empty")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape like "\ud800": TEI's JSON parser refuses it (400)
            raise ApiError(400, f"{where}: text is not valid Unicode (a lone surrogate escape)") from None
    truncate = data.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise ApiError(422, f'"truncate" must be true, false or null, got {truncate!r}')
    direction = data.get("truncation_direction")
    if direction is not None:
        if not isinstance(direction, str) or direction.lower() not in _DIRECTIONS:
            raise ApiError(422, f'"truncation_direction" must be "Right" or "Left", got {direction!r}')
        direction = _DIRECTIONS[direction.lower()]
    raw = data.get("raw_scores")
    if raw is not None and not isinstance(raw, bool):
        raise ApiError(422, f'"raw_scores" must be true or false, got {raw!r}')
    transform, top_k = _parameters(data.get("parameters"))
    return PredictRequest(texts, single, truncate, direction, "none" if raw else transform, top_k)


def _inputs(inputs) -> tuple[list[str], bool]:
    """TEI's PredictInput: a string; a flat list of 1 (one text) or 2 (a pair); or a batch of 1-lists."""
    if isinstance(inputs, str):
        return [inputs], True
    if not isinstance(inputs, list):
        raise ApiError(422, f'"inputs" must be a string or a list, got {_kind(inputs)}; send {_EXAMPLE}')
    if not inputs:
        raise ApiError(422, f'"inputs" is an empty list; send {_EXAMPLE}')
    if isinstance(inputs[0], str):  # not a batch: one text or a pair
        other = next((x for x in inputs if not isinstance(x, str)), None)
        if other is not None:
            raise ApiError(422, f'"inputs" mixes strings and {_kind(other)}; send {_EXAMPLE}')
        if len(inputs) == 1:
            return inputs, True
        if len(inputs) == 2:
            raise ApiError(422, '"inputs" is a text pair ["text", "text"]; offramp classifies single texts only. '
                                'For a batch of two texts send [["text 1"], ["text 2"]]')
        raise ApiError(422, f'"inputs" is a flat list of {len(inputs)} strings: TEI reads a flat list as one text or '
                            'a text pair; send a batch as [["text 1"], ["text 2"], ...]')
    texts = []
    for i, x in enumerate(inputs):
        if isinstance(x, list) and len(x) == 1 and isinstance(x[0], str):
            texts.append(x[0])
        elif isinstance(x, list) and len(x) == 2 and all(isinstance(s, str) for s in x):
            raise ApiError(422, f'"inputs"[{i}] is a text pair; offramp classifies single texts only')
        else:
            raise ApiError(422, f'"inputs"[{i}] is {_kind(x)}; each batch item must be a one-string list ["text"]')
    return texts, False


def _parameters(params) -> tuple[str, int | None]:
    """huggingface_hub's text-classification parameters; others are ignored."""
    if params is None:
        return None, None
    if not isinstance(params, dict):
        raise ApiError(422, f'"parameters" must be an object, got {_kind(params)}')
    top_k = params.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ApiError(422, f'"parameters.top_k" must be a positive integer, got {top_k!r}')
    fn = params.get("function_to_apply")
    if fn is None:
        return None, top_k
    if not isinstance(fn, str) or fn.lower() not in _TRANSFORMS:
        raise ApiError(422, f'"parameters.function_to_apply" must be one of {list(_TRANSFORMS)}, got {fn!r}')
    return fn.lower(), top_k


def _kind(x) -> str:
    names = {type(None): "null", dict: "an object", list: "a list", bool: "a boolean", int: "an integer",
             float: "a number", str: "a string"}
    return names.get(type(x), f"a {type(x).__name__}")


def _scores(x: list[float], transform: str) -> list[float]:
    """One text's logits -> its scores (plain Python: a few labels per text, cheaper than numpy's calls)."""
    if transform == "softmax":
        m = max(x)
        e = [math.exp(v - m) for v in x]
        total = sum(e)
        return [v / total for v in e]
    if transform == "sigmoid":  # both branches keep exp() from overflowing
        return [1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v)) for v in x]
    return list(x)


def label_scores(logits, labels: list[str], transform: str = "softmax", top_k: int | None = None,
                 top: dict | None = None) -> list[dict]:
    """Every label with its score, highest first (ties: the lower label id first, as argmax picks);
    `top` adds keys to the first entry."""
    s = _scores([float(v) for v in logits], transform)
    order = sorted(range(len(s)), key=lambda i: -s[i])[:top_k]
    rows = [{"label": labels[i], "score": s[i]} for i in order]
    if top:
        rows[0].update(top)
    return rows


def prediction_body(predictions, labels: list[str], req: PredictRequest, head_transform: str = "softmax",
                    with_answer: bool = False) -> list:
    """TEI-shaped JSON for answered predictions (callers check `error` first). `head_transform`: the scores when
    the request names none (the head's kind's); `with_answer`: the answer rides on the top entry as `answer` (a
    regression's bin or a multi-label set, which the top-scored label is not). A prediction without logits
    (a custom predictor_class that does not set them) gives its predicted label only."""
    transform = req.transform or head_transform
    rows = [label_scores(p.logits, labels, transform, req.top_k,
                         {"exit_layer": int(p.exit_layer), "threshold_version": p.threshold_version,
                          **({"answer": p.label} if with_answer else {})})
            if p.logits is not None else
            [{"label": p.label, "score": float(p.score), "exit_layer": int(p.exit_layer),
              "threshold_version": p.threshold_version}]
            for p in predictions]
    return rows[0] if req.single else rows


def info_body(*, model_id: str, dtype: str, labels: list[str], max_input_length: int, batching, version: str,
              offramp: dict) -> dict:
    """GET /info: TEI's Info for a classifier, plus offramp's own block (ramps, thresholds, mode)."""
    return {
        "model_id": model_id,
        "model_sha": None,
        "model_dtype": dtype,
        "served_model_name": model_id,
        "model_type": {"classifier": {"id2label": {str(i): n for i, n in enumerate(labels)},
                                      "label2id": {n: i for i, n in enumerate(labels)}}},
        "max_concurrent_requests": batching.max_queue,  # texts queued per replica before 429
        "max_input_length": max_input_length,
        "max_batch_tokens": batching.max_batch_tokens,
        "max_batch_requests": batching.max_batch_size,
        "max_client_batch_size": batching.max_items_per_request,
        "auto_truncate": True,
        "tokenization_workers": 1,
        "version": version,
        "sha": None,
        "docker_label": None,
        "offramp": offramp,
    }
