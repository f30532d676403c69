"""Typed, validated configuration. YAML files under configs/ only fill these in.

Every field carries a docstring; every check names the bad value and the fix.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["exit", "release"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in YAML must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineConfig(_Strict):
    """How one worker runs the early-exit model on a batch of texts."""

    mode: Mode = "exit"
    """`exit`: exited rows leave the batch so later layers run on fewer rows (saves compute).
    `release`: every row runs to the end; exited rows' answers are released early (saves latency)."""
    shadow_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """In `exit` mode, the share of rows that always run to the end to feed the controller."""
    token_budget: int = Field(8192, ge=16)
    """Initial micro-batch size in padded tokens (rows x longest row)."""
    max_batch_rows: int = Field(256, ge=1)
    """Upper bound on rows per micro-batch whatever the token budget."""
    latency_target_s: float = Field(0.25, gt=0)
    """Adaptive batching grows the token budget while micro-batches finish under this."""
    max_token_budget: int = Field(65536, ge=16)
    """The adaptive token budget never grows past this."""
    max_length: int | None = Field(None, ge=8)
    """Truncate inputs to this many tokens (default: the model's own maximum). Truncated rows are flagged."""
    device: str = "auto"
    """`auto` (CUDA when torch sees it, else CPU), `cpu`, `cuda` or `cuda:N`."""
    dtype: DType = "auto"
    """Compute dtype. `auto`: float16 on CUDA, float32 on CPU. bfloat16 is fast on CPUs with AVX-512 BF16."""
    num_threads: int | None = Field(None, ge=1)
    """torch intra-op threads for CPU inference (default: torch's choice)."""
    thresholds: list[float] | None = None
    """Override the artifact's per-ramp thresholds (>= 1.0 closes a ramp). Default: the manifest's."""

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError(f"device={v!r} is not understood; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @model_validator(mode="after")
    def _budgets(self) -> "EngineConfig":
        if self.token_budget > self.max_token_budget:
            raise ValueError(
                f"token_budget={self.token_budget} exceeds max_token_budget={self.max_token_budget}; "
                "raise max_token_budget or lower token_budget"
            )
        return self


class FinetuneConfig(_Strict):
    """Fine-tuning an original classifier (the demo needs a real one)."""

    base: str = "minilm-l6"
    """`minilm-l6` (the packaged all-MiniLM-L6-v2), a local HF model directory, or a hub id."""
    dataset: str = "movie-reviews"
    """A built-in dataset name or a parquet/jsonl/csv path or fsspec URL."""
    text_column: str = "text"
    label_column: str = "label"
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    max_length: int = Field(128, ge=8)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (tests and smoke runs)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N training rows."""
    seed: int = 0


class BootstrapConfig(_Strict):
    """Training ramps at every cut point by distillation from the original model."""

    data: str = "movie-reviews"
    """A built-in dataset name or a parquet/jsonl/csv path or fsspec URL (labels not needed)."""
    text_column: str = "text"
    pooling: Literal["mean", "cls"] = "mean"
    """Ramp pooling: masked mean over tokens (measured far better on early layers) or the [CLS] vector."""
    temperature: float = Field(2.0, gt=0)
    """Distillation temperature for the soft targets."""
    epochs: int = Field(30, ge=1)
    """Ramp training epochs over the cached pooled features (cheap: the encoder runs once)."""
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    """Encoder batch size while caching features."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Held-out share for per-ramp agreement and initial thresholds (URL data; built-ins use their split)."""
    constraint: float = Field(0.01, ge=0, lt=1)
    """Accuracy constraint for the initial thresholds: at most this share of disagreement."""
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0


class ControllerConfig(_Strict):
    """The shared threshold controller (see pipeline.control)."""

    enabled: bool = True
    constraint: float = Field(0.01, ge=0, lt=1)
    """Bound on 1 - agreement with the original model's prediction."""
    window_rows: int = Field(512, ge=16)
    """Feedback rows per tuning window."""
    refresh_every_batches: int = Field(4, ge=1)
    """Workers fetch the controller's state every this many batches."""
    ramp_budget: int | None = Field(None, ge=1)
    """Maximum active ramps (default: all)."""
    checkpoint_url: str | None = None
    """fsspec URL where the controller checkpoints its state (restored on restart)."""
    name: str | None = None
    """Actor name (default: derived from the model directory)."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data
