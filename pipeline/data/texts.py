"""What makes a value classifiable: one check for every path that takes texts (jobs, Serve, training), and the
kind of every per-row error a job reports."""
from __future__ import annotations

import re


def validate_text(text) -> str | None:
    """Why a value cannot be classified, or None if it can."""
    if text is None:
        return "text is null; supply a non-empty string"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string; convert it to str first"
    if not text.strip():
        return "text is empty or whitespace only; supply a non-empty string"
    return None


# How each row error the pipeline writes begins (after a reader's `line N: `), and its kind. The messages come
# from validate_text, pipeline.data.readers.read_jsonl and the engine's Predictor ("inference failed: ...").
ERROR_KINDS = (
    ("malformed_json", re.compile(r"not valid JSON\b")),
    ("not_an_object", re.compile(r"not a JSON object\b")),
    ("missing_text", re.compile(r"no .+ field$")),
    ("null_text", re.compile(r"text is null\b")),
    ("empty_text", re.compile(r"text is empty\b")),
    ("text_not_string", re.compile(r"text is \w+, not a string\b")),
    ("inference_failed", re.compile(r"inference failed\b")),
)
_LINE = re.compile(r"^line \d+: ")


def error_kind(message: str) -> str:
    """The kind of a row's error (ERROR_KINDS), `other` for a message none of them starts."""
    text = _LINE.sub("", message, count=1)
    for kind, pattern in ERROR_KINDS:
        if pattern.match(text):
            return kind
    return "other"
