"""What makes a value classifiable: one check for every path that takes texts (jobs, Serve, training)."""
from __future__ import annotations


def validate_text(text) -> str | None:
    """Why a value cannot be classified, or None if it can."""
    if text is None:
        return "text is null; supply a non-empty string"
    if not isinstance(text, str):
        return f"text is {type(text).__name__}, not a string; convert it to str first"
    if not text.strip():
        return "text is empty or whitespace only; supply a non-empty string"
    return None
