"""Llama sequence classifiers (e.g. Llama Guard-style safety models): the shared decoder mechanics (decoder.py)."""
from __future__ import annotations

from pipeline.model.families.base import register
from pipeline.model.families.decoder import Decoder


@register("LlamaForSequenceClassification")
class Llama(Decoder):
    family = "llama"
