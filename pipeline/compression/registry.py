"""The compression registry: a method is one `register(name, ConfigClass, transform)` entry (cf. torchao
`quantize_`); `apply(model, method)` runs its transform in place on an EarlyExitModel or a bare HF sequence
classifier and marks the model with the method's record.

Artifacts never store packed (quantized) tensors: they keep float safetensors weights and record
`{"method": ..., "config": {...}}`; loading re-applies the transform, a deterministic function of the float
weights (dynamic int8) or a dtype cast (fp16 / bf16). The built-in methods live in transforms.py; whether a
method is fast on a device, in capability.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

_MARK = "_offramp_compression"  # attribute set on a compressed model: the method's record


@dataclass(frozen=True)
class _Entry:
    name: str
    config_cls: type
    transform: Callable[[nn.Module, Any], nn.Module]
    defaults: dict[str, Any]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def _builtins() -> dict[str, _Entry]:
    """The registry, with the built-in methods registered on first use (transforms.py imports torch kernels)."""
    if not _REGISTRY:
        from pipeline.compression import transforms  # noqa: F401 - registers int8-dynamic, fp16, bf16
    return _REGISTRY


def register(name: str, config_cls: type, transform: Callable[[nn.Module, Any], nn.Module],
             summary: str = "", **defaults: Any) -> None:
    """Add a method: `name` (what users type), its config class (+ default field values), its transform."""
    if name in _REGISTRY:
        raise ValueError(f"compression method {name!r} is already registered")
    _REGISTRY[name] = _Entry(name, config_cls, transform, defaults, summary)


def methods() -> list[str]:
    """Registered method names, e.g. ['int8-dynamic', 'fp16', 'bf16']."""
    return list(_builtins())


def _entry(name: str) -> _Entry:
    if name not in _builtins():
        raise ValueError(f"compression method {name!r} is unknown; use one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def make_config(method: str, **overrides: Any):
    """The config object for `method` with its registered defaults, then `overrides`."""
    e = _entry(method)
    fields = {f.name for f in dataclasses.fields(e.config_cls)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"{method}: unknown option(s) {bad}; known: {sorted(fields)}")
    return e.config_cls(**{**e.defaults, **overrides})


def to_record(method: str, config=None) -> dict[str, Any]:
    """JSON-able record stored in a manifest / compression.json: {"method": ..., "config": {...}}."""
    config = config if config is not None else make_config(method)
    if not isinstance(config, _entry(method).config_cls):
        raise TypeError(f"{method} takes a {_entry(method).config_cls.__name__}, not {type(config).__name__}")
    return {"method": method, "config": dataclasses.asdict(config)}


def from_record(record: str | dict[str, Any]):
    """(method, config) from a method name or a stored record."""
    if isinstance(record, str):
        return record, make_config(record)
    if not isinstance(record, dict) or "method" not in record:
        raise ValueError(f"compression record {record!r} has no 'method'; expected e.g. {{'method': 'int8-dynamic'}}")
    return record["method"], make_config(record["method"], **(record.get("config") or {}))


def compression_of(model: nn.Module) -> dict[str, Any] | None:
    """The record of the method applied to `model` by `apply`, or None for an uncompressed model."""
    return getattr(model, _MARK, None)


def apply(model: nn.Module, method: str | dict[str, Any], config=None) -> nn.Module:
    """Compress `model` (EarlyExitModel or HF sequence classifier) in place and return it.

    `method` is a registered name (with `config`, or its defaults) or a stored record. Applying a
    second method to an already compressed model is refused: stacked transforms are never checked.
    """
    if config is None:
        method, config = from_record(method)
    elif not isinstance(method, str):
        raise TypeError("pass config only with a method name")
    record = to_record(method, config)
    done = compression_of(model)
    if done is not None:
        if done == record:
            return model
        raise ValueError(
            f"model is already compressed with {done['method']}; applying {method} on top is not supported: "
            "start again from the float model"
        )
    _entry(method).transform(model, config)
    object.__setattr__(model, _MARK, record)
    return model
