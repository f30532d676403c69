"""Mistral sequence classifiers: every layer attends within `sliding_window` tokens when the config sets one
(the model has no per-layer types: MistralModel picks one mask for all layers)."""
from __future__ import annotations

from pipeline.model.families.base import register
from pipeline.model.families.decoder import Decoder


@register("MistralForSequenceClassification")
class Mistral(Decoder):
    family = "mistral"

    @property
    def layer_types(self):
        kind = "full_attention" if self.config.sliding_window is None else "sliding_attention"
        return [kind] * self.config.num_hidden_layers
