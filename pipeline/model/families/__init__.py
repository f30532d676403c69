"""Model families: one module each, registered by the transformers classes they serve (see base.py).

To add a family: a module here with a `Backbone` subclass decorated with `@register("XForSequenceClassification")`,
imported below, and a tiny random model of it in the equivalence tests (tests/unit/test_families.py)."""
from pipeline.model.families import (  # noqa: F401 - registers them
    albert,
    bert,
    deberta_v2,
    distilbert,
    electra,
    gemma,
    llama,
    mistral,
    modernbert,
    mpnet,
    qwen,
    roberta,
)
from pipeline.model.families.base import Backbone, backbone, half_dtype_of, register, supported_classes

__all__ = ["Backbone", "backbone", "half_dtype_of", "register", "supported_classes"]
