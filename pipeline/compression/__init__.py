"""Compression: quantization (int8 dynamic, fp16, bf16) and layer-dropping distillation, each checked
against its uncompressed source (agreement, and gold accuracy when labels exist)."""
from pipeline.compression.registry import (
    CastConfig,
    Int8DynamicConfig,
    apply,
    apply_at_load,
    compression_of,
    from_record,
    make_config,
    methods,
    register,
    to_record,
)

__all__ = [
    "CastConfig",
    "Int8DynamicConfig",
    "apply",
    "apply_at_load",
    "compression_of",
    "from_record",
    "make_config",
    "methods",
    "register",
    "to_record",
]
