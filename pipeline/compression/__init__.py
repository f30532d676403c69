"""Compression: quantization (int8 dynamic, fp16, bf16) and layer-dropping distillation, each checked
against its uncompressed source (agreement, and gold accuracy when labels exist).

The registry (and torch) loads on first use, so `offramp --help` and the CLI's imports stay light.
"""
__all__ = [
    "CastConfig",
    "Int8DynamicConfig",
    "apply",
    "apply_at_load",
    "apply_where_fast",
    "compression_of",
    "compression_status",
    "from_record",
    "make_config",
    "methods",
    "register",
    "slow_here",
    "to_record",
]


def __getattr__(name: str):
    if name in __all__:
        from pipeline.compression import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'pipeline.compression' has no attribute {name!r}")
