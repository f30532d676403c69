"""The one way the engine loads an early-exit artifact: float weights, then its recorded compression."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.model.artifact import load_float_artifact


def load_artifact(path: str | Path, device: str = "cpu", dtype=None,
                  slow_compression: Literal["skip", "apply"] = "skip"):
    """(EarlyExitModel, tokenizer, manifest) on `device`; `path` is a directory or a URL (s3://, gs://, ...: this
    node's cached copy, pipeline.data.cache). A recorded compression is re-applied from the float
    weights (deterministic, nothing packed on disk); `slow_compression` "skip" keeps the float weights where
    its kernels are slow (pipeline.compression.capability.apply_where_fast), "apply" compresses anyway."""
    model, tokenizer, manifest = load_float_artifact(path, device, dtype)
    if manifest.compression:
        from pipeline.compression import apply_where_fast

        apply_where_fast(model, manifest.compression, slow_compression)
    return model, tokenizer, manifest
