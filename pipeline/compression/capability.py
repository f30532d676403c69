"""Whether a compression method runs, and runs fast, on a device; applying it only where it does (the float
weights run otherwise, and the model says why)."""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from pipeline.compression.registry import apply, compression_of, from_record, to_record

log = logging.getLogger(__name__)

SKIPPED = "_offramp_compression_skipped"  # the record apply_where_fast did not apply (float weights kept)


def param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def cannot_run_here(method: str | dict[str, Any], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> str | None:
    """Why `method` has no kernels at all for a `dtype` model on `device`; None when it can run there.

    (int8-dynamic backend onednn needs float32 weights on an x86 CPU with AVX2.)
    """
    name, cfg = from_record(method)
    if name != "int8-dynamic" or cfg.backend != "onednn":
        return None
    if torch.device(device).type != "cpu":
        return "backend onednn runs on CPU only"
    if dtype != torch.float32:
        return f"backend onednn needs float32 weights, not {dtype}"
    from pipeline.compression.int8_onednn import available

    return available()


def slow_here(method: str | dict[str, Any], device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> str | None:
    """Why `method` would run slower than the float model on `device`, or cannot run there at all
    (`cannot_run_here`); None when its kernels are fast here.

    torchao's int8-dynamic multiplies with torch._int_mm, which on a CPU calls oneDNN only when the CPU has
    AVX512-VNNI and otherwise runs a reference loop, an order of magnitude slower than float32.
    """
    if reason := cannot_run_here(method, device, dtype):
        return reason
    name, cfg = from_record(method)
    if (name == "int8-dynamic" and cfg.backend == "torchao" and torch.device(device).type == "cpu"
            and not torch.cpu._is_vnni_supported()):
        from pipeline.compression.int8_onednn import available

        hint = "; `offramp quantize --backend onednn` makes an artifact that is fast here" if available() is None else ""
        return ("this CPU has no AVX512-VNNI, so torch's int8 matmul runs a reference loop (~17x slower than "
                "float32)" + hint)
    return None


def apply_where_fast(model: nn.Module, method: str | dict[str, Any],
                     slow: Literal["skip", "apply"] = "skip") -> nn.Module:
    """`apply`, unless the method has no fast kernels on the model's device (`slow_here`) and `slow` is
    "skip", or no kernels at all (`cannot_run_here`): then the model keeps its float weights, a warning is
    logged, and `compression_status` says so."""
    if slow not in ("skip", "apply"):
        raise ValueError(f"slow={slow!r} must be 'skip' or 'apply'")
    name, config = from_record(method)
    device, dtype = param_device(model), param_dtype(model)
    reason = slow_here(method, device, dtype)
    if reason is None or (slow == "apply" and cannot_run_here(method, device, dtype) is None):
        return apply(model, name, config)
    log.warning("%s skipped: %s; running the float weights", name, reason)
    object.__setattr__(model, SKIPPED, to_record(name, config))
    return model


def compression_status(model: nn.Module) -> str:
    """What runs: "none", the method applied (e.g. "int8-dynamic"), or "<method> skipped: <why>"."""
    done = compression_of(model)
    if done is not None:
        return done["method"]
    skipped = getattr(model, SKIPPED, None)
    if skipped is None:
        return "none"
    why = slow_here(skipped, param_device(model), param_dtype(model))
    return f"{skipped['method']} skipped: {why}; the float weights ran"


def apply_at_load(model: nn.Module, method: str | None, slow: Literal["skip", "apply"] = "skip") -> nn.Module:
    """EngineConfig.compression: apply `method` (defaults) unless the model already carries it, or (`slow`:
    "skip") it has no fast kernels on the model's device (see `apply_where_fast`).

    A model loaded from an artifact that records a method has it applied (or skipped) already by
    load_artifact; asking for the same method again is a no-op, asking for another one is an error.
    """
    if method is None:
        return model
    done = compression_of(model) or getattr(model, SKIPPED, None)
    if done is not None:
        if done["method"] == method:
            return model
        raise ValueError(
            f"engine compression={method!r} but the artifact is already compressed with {done['method']!r}; "
            "unset engine.compression or use the float artifact"
        )
    return apply_where_fast(model, method, slow)
