"""The built-in compression methods: their configs and transforms, registered by name (int8-dynamic, fp16,
bf16). A new method is a config dataclass, a transform, and one `register` call here."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from pipeline.compression.capability import cannot_run_here, param_device
from pipeline.compression.registry import register, to_record

log = logging.getLogger(__name__)


Int8Backend = Literal["torchao", "onednn", "torch-ao"]
INT8_BACKENDS = get_args(Int8Backend)


@dataclass(frozen=True)
class Int8DynamicConfig:
    """int8 dynamic quantization of the encoder layers' Linear modules (for CPU).

    Weights are int8 with one scale per output channel; activations are quantized on the fly, per row
    (torchao, onednn) or per tensor (torch.ao). Embeddings, LayerNorms, the original head and the ramps stay
    float: they are a few percent of the compute and carry the decision margins.

    The default (torchao, compiled) keeps per-row activation scales, so it stays closest to the float model;
    torch.ao's per-tensor activations flip a few percent of predictions. torchao's int8 matmul is fast only with
    AVX512-VNNI; `onednn` is the backend for AVX2 CPUs (see int8_onednn.py). Measurements: docs/benchmarks.md.
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


def _hf(model: nn.Module) -> nn.Module:
    return getattr(model, "hf_model", model)  # EarlyExitModel wraps the HF classifier


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The distinct layer modules (where ~all compute is) of an EarlyExitModel or an HF classifier."""
    from pipeline.model.families import backbone

    return backbone(_hf(model)).modules


def _int8_dynamic(model: nn.Module, cfg: Int8DynamicConfig) -> nn.Module:
    layers = encoder_layers(model)
    dtype = next(layers.parameters()).dtype
    if cfg.backend == "onednn":
        if reason := cannot_run_here(to_record("int8-dynamic", cfg), param_device(model), dtype):
            raise ValueError(f"int8-dynamic cannot run here: {reason}")
        from pipeline.compression.int8_onednn import swap_linears as transform
    elif cfg.backend == "torch-ao":
        if param_device(model).type != "cpu":
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
    if param_device(model).type == "cpu" and dtype == torch.float16:
        log.info("fp16 on CPU runs but is slow on most CPUs; bf16 is the CPU choice")
    return model.to(dtype=dtype)


register("int8-dynamic", Int8DynamicConfig, _int8_dynamic,
         "int8 weights + dynamically quantized activations in the encoder's Linear layers (CPU)")
register("fp16", CastConfig, _cast, "float16 weights and compute (GPU)", dtype="float16")
register("bf16", CastConfig, _cast, "bfloat16 weights and compute (GPU; CPUs with AVX-512 BF16 / AMX)",
         dtype="bfloat16")
