"""Compression methods: small config classes mapped to transforms by a registry (cf. torchao `quantize_`).

A method is one `register(name, ConfigClass, transform)` entry. `apply(model, method)` runs the
transform in place on an EarlyExitModel or a bare HF sequence classifier and returns the model.

Artifacts never store packed (quantized) tensors: they keep float safetensors weights and record
`{"method": ..., "config": {...}}`; loading re-applies the transform, which is a deterministic
function of the float weights (dynamic int8) or a dtype cast (fp16 / bf16), unless the device has no
fast kernels for it (`apply_where_fast`: then the float weights run).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, get_args

import torch
from torch import nn

log = logging.getLogger(__name__)

_MARK = "_offramp_compression"  # attribute set on a compressed model: the method's record
_SKIPPED = "_offramp_compression_skipped"  # the record apply_where_fast did not apply (float weights kept)


Int8Backend = Literal["torchao", "onednn", "torch-ao"]
INT8_BACKENDS = get_args(Int8Backend)


@dataclass(frozen=True)
class Int8DynamicConfig:
    """int8 dynamic quantization of the encoder layers' Linear modules (for CPU).

    Weights are int8 with one scale per output channel; activations are quantized on the fly, per row
    (torchao, onednn) or per tensor (torch.ao). Embeddings, LayerNorms, the original head and the ramps stay
    float: they are a few percent of the compute and carry the decision margins.

    Default chosen by measurement (fine-tuned MiniLM-L6, movie-review test split, 2,113 rows,
    length-sorted batches of 64, 2 Zen 4 threads, best of 4 interleaved passes):
        float32 244 rows/s | torch.ao per-tensor 536 (2.20x, agreement 93.9%, logit SQNR 13 dB)
        torch.ao per-channel 470 (1.93x, 96.8%, 17 dB) | torchao eager 215 (0.88x, 99.57%, 31 dB)
        torchao + torch.compile 558 (2.29x, 99.53%, 31 dB)  <- default
    torch.ao quantizes activations per tensor with a reduced range and flips ~3-6% of predictions;
    torchao's per-row activation scales keep 99.5%, and compiled it is also the fastest.
    Without AVX512-VNNI torchao's int8 matmul is a slow reference loop; `onednn` is the backend for such
    CPUs (AVX2): per-token 7-bit activations, 99.53% agreement, 1.64x float32 (see int8_onednn.py).
    """

    backend: Int8Backend = "torchao"
    """`torchao`: torchao's Int8DynamicActivationInt8WeightConfig (`pip install torchao`; fast with
    AVX512-VNNI); `onednn`: oneDNN's int8 Linear with per-token activation scales (fast on AVX2 too);
    `torch-ao`: torch.ao.quantization.quantize_dynamic (deprecated upstream; no extra dependency; lossy)."""
    per_channel: bool = True
    """torch-ao only: one weight scale per output channel (per-tensor is lossier still)."""
    compile: bool = True
    """torchao: torch.compile each encoder layer (dynamic shapes); eager torchao is slower than float, and
    compiling costs ~15 s of warm-up per process on 2 cores. onednn: the same; it fuses the per-token quantize
    and rescale steps with the layer's other elementwise work (eager, those steps cost about as much as the
    int8 matmul)."""

    def __post_init__(self):
        if self.backend not in INT8_BACKENDS:
            raise ValueError(f"int8-dynamic backend {self.backend!r} is not one of {', '.join(INT8_BACKENDS)}")
        if self.compile and self.backend == "torch-ao":
            object.__setattr__(self, "compile", False)  # torch.ao's packed ops are not compiled


@dataclass(frozen=True)
class CastConfig:
    """Cast every float weight (encoder, head and ramps) to a lower-precision float dtype."""

    dtype: Literal["float16", "bfloat16"] = "bfloat16"

    def __post_init__(self):
        if self.dtype not in ("float16", "bfloat16"):
            raise ValueError(f"cast dtype {self.dtype!r} is not 'float16' or 'bfloat16'")


@dataclass(frozen=True)
class _Entry:
    name: str
    config_cls: type
    transform: Callable[[nn.Module, Any], nn.Module]
    defaults: dict[str, Any]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, config_cls: type, transform: Callable[[nn.Module, Any], nn.Module],
             summary: str = "", **defaults: Any) -> None:
    """Add a method: `name` (what users type), its config class (+ default field values), its transform."""
    if name in _REGISTRY:
        raise ValueError(f"compression method {name!r} is already registered")
    _REGISTRY[name] = _Entry(name, config_cls, transform, defaults, summary)


def methods() -> list[str]:
    """Registered method names, e.g. ['int8-dynamic', 'fp16', 'bf16']."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
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


def cannot_run_here(method: str | dict[str, Any], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> str | None:
    """Why `method` has no kernels at all for a `dtype` model on `device`; None when it can run there.

    Today: int8-dynamic backend onednn, which needs float32 weights on an x86 CPU with AVX2.
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
    AVX512-VNNI and otherwise runs a reference loop. Measured on a 2-core AVX2 EPYC (torch 2.13, 1 thread):
    int8 2048x384 @ 384x384 in 0.39 s against 0.023 s in float32; one int8 MiniLM layer 100 s per 57k tokens.
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
    device, dtype = _param_device(model), _param_dtype(model)
    reason = slow_here(method, device, dtype)
    if reason is None or (slow == "apply" and cannot_run_here(method, device, dtype) is None):
        return apply(model, name, config)
    log.warning("%s skipped: %s; running the float weights", name, reason)
    object.__setattr__(model, _SKIPPED, to_record(name, config))
    return model


def compression_status(model: nn.Module) -> str:
    """What runs: "none", the method applied (e.g. "int8-dynamic"), or "<method> skipped: <why>"."""
    done = compression_of(model)
    if done is not None:
        return done["method"]
    skipped = getattr(model, _SKIPPED, None)
    if skipped is None:
        return "none"
    why = slow_here(skipped, _param_device(model), _param_dtype(model))
    return f"{skipped['method']} skipped: {why}; the float weights ran"


def apply_at_load(model: nn.Module, method: str | None, slow: Literal["skip", "apply"] = "skip") -> nn.Module:
    """EngineConfig.compression: apply `method` (defaults) unless the model already carries it, or (`slow`:
    "skip") it has no fast kernels on the model's device (see `apply_where_fast`).

    A model loaded from an artifact that records a method has it applied (or skipped) already by
    load_artifact; asking for the same method again is a no-op, asking for another one is an error.
    """
    if method is None:
        return model
    done = compression_of(model) or getattr(model, _SKIPPED, None)
    if done is not None:
        if done["method"] == method:
            return model
        raise ValueError(
            f"engine quantize={method!r} but the artifact is already compressed with {done['method']!r}; "
            "unset quantize or use the float artifact"
        )
    return apply_where_fast(model, method, slow)


# -- transforms ---------------------------------------------------------------------------------------
def _hf(model: nn.Module) -> nn.Module:
    return getattr(model, "hf_model", model)  # EarlyExitModel wraps the HF classifier


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers (where ~all compute is) of an EarlyExitModel or an HF classifier."""
    from pipeline.model.encoders import encoder_parts

    return encoder_parts(_hf(model)).layers


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _int8_dynamic(model: nn.Module, cfg: Int8DynamicConfig) -> nn.Module:
    layers = encoder_layers(model)
    dtype = next(layers.parameters()).dtype
    if cfg.backend == "onednn":
        if reason := cannot_run_here(to_record("int8-dynamic", cfg), _param_device(model), dtype):
            raise ValueError(f"int8-dynamic cannot run here: {reason}")
        from pipeline.compression.int8_onednn import swap_linears as transform
    elif cfg.backend == "torch-ao":
        if _param_device(model).type != "cpu":
            raise ValueError("int8-dynamic with backend torch-ao runs on CPU only; on GPU use fp16/bf16 "
                             "or backend='torchao'")
        if dtype != torch.float32:
            raise ValueError(f"int8-dynamic (torch-ao) needs a float32 model, got {dtype}; load it with dtype float32")
        import warnings

        from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

        qconfig = per_channel_dynamic_qconfig if cfg.per_channel else default_dynamic_qconfig

        def transform(layer: nn.Module) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
                quantize_dynamic(layer, {nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)
    else:
        try:
            logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA/.so kernels it cannot load here
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError as e:
            raise RuntimeError("int8-dynamic backend 'torchao' needs torchao: pip install torchao") from e
        if cfg.compile:
            import warnings

            # torchao's Int8Tensor lacks a cache hash; harmless (AOT autograd cache only), noisy on every compile.
            warnings.filterwarnings("ignore", message="Int8Tensor does not implement _stable_hash_for_caching")

        def transform(layer: nn.Module) -> None:
            quantize_(layer, Int8DynamicActivationInt8WeightConfig())
    # In place on each layer: the ModuleList (held by the EarlyExitModel's parts) stays the same.
    for layer in layers:
        transform(layer)
        if cfg.compile:  # never for torch-ao (Int8DynamicConfig turns it off)
            layer.compile(dynamic=True)
    return model


def _cast(model: nn.Module, cfg: CastConfig) -> nn.Module:
    dtype = getattr(torch, cfg.dtype)
    if _param_device(model).type == "cpu" and dtype == torch.float16:
        log.info("fp16 on CPU runs but is slow on most CPUs; bf16 is the CPU choice")
    return model.to(dtype=dtype)


register("int8-dynamic", Int8DynamicConfig, _int8_dynamic,
         "int8 weights + dynamically quantized activations in the encoder's Linear layers (CPU)")
register("fp16", CastConfig, _cast, "float16 weights and compute (GPU)", dtype="float16")
register("bf16", CastConfig, _cast, "bfloat16 weights and compute (GPU; CPUs with AVX-512 BF16 / AMX)",
         dtype="bfloat16")
