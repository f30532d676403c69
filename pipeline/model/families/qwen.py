"""Qwen2 and Qwen3 sequence classifiers: the shared decoder mechanics (decoder.py). Qwen2 may use a sliding window
on the layers from `max_window_layers` up (`use_sliding_window`): its config's `layer_types` says which."""
from __future__ import annotations

from pipeline.model.families.base import register
from pipeline.model.families.decoder import Decoder


@register("Qwen2ForSequenceClassification")
class Qwen2(Decoder):
    family = "qwen2"


@register("Qwen3ForSequenceClassification")
class Qwen3(Decoder):
    family = "qwen3"
