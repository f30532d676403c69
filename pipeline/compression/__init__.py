"""Compression: quantization (int8 dynamic, fp16, bf16) and layer-dropping distillation, each checked
against its uncompressed source (agreement, and gold accuracy when labels exist).

The registry, capability and transforms (and torch) load on first use, so `offramp --help` and the CLI's imports stay light.
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


_HOME = {"CastConfig": "transforms", "Int8DynamicConfig": "transforms", "apply_at_load": "capability",
         "apply_where_fast": "capability", "compression_status": "capability", "slow_here": "capability"}


def __getattr__(name: str):
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"pipeline.compression.{_HOME.get(name, 'registry')}"), name)
    raise AttributeError(f"module 'pipeline.compression' has no attribute {name!r}")
