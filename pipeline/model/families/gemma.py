"""Gemma, Gemma 2 and Gemma 3 (text) sequence classifiers: the shared decoder mechanics (decoder.py).

Gemma scales its embeddings by sqrt(hidden) inside the embedding module and Gemma 2/3 soft-cap attention logits
inside attention, so calling the modules covers both. Gemma 2/3 alternate sliding-window and global layers
(`layer_types`); Gemma 3's local layers also have their own rotary base, so its rotary table is per layer type.
The multimodal Gemma3ForSequenceClassification (image tokens, a vision tower) is not served.
"""
from __future__ import annotations

from pipeline.model.families.base import register
from pipeline.model.families.decoder import Decoder


@register("GemmaForSequenceClassification")
class Gemma(Decoder):
    family = "gemma"


@register("Gemma2ForSequenceClassification")
class Gemma2(Decoder):
    family = "gemma2"


@register("Gemma3TextForSequenceClassification")
class Gemma3Text(Decoder):
    family = "gemma3_text"

    def __init__(self, model):
        if getattr(model.config, "use_bidirectional_attention", False):
            raise ValueError("a Gemma 3 config with use_bidirectional_attention=True (EmbeddingGemma-style) is not "
                             "supported: offramp steps through causal decoder classifiers only")
        super().__init__(model)

    def rotary(self, hidden, positions):
        return {t: self.base.rotary_emb(hidden, positions, t) for t in set(self.layer_types)}
