"""ModernBERT: rotary positions, global attention every `global_attn_every_n_layers` layers and a sliding window
(`local_attention` tokens) between, `final_norm` before the head, head pooling `cls` or `mean`.

Each layer type has its own mask and its own rotary tables (`config.layer_types[i]` says which a layer uses).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from pipeline.model.families.base import Backbone, register

# Padded attention: our masks are 4D [B,1,S,S] over right-padded rows. A flash-attention checkpoint would make the
# model's mask helpers return the 2D mask its varlen kernel unpads with; the padded path is the one checked here.
_PADDED = ("sdpa", "eager")

log = logging.getLogger(__name__)


class _State(NamedTuple):
    masks: dict[str, torch.Tensor]  # layer type -> 4D mask
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin) [1,S,head_dim]


@register("ModernBertForSequenceClassification")
class ModernBert(Backbone):
    family = "modernbert"

    def __init__(self, model):
        if model.config._attn_implementation not in _PADDED:
            log.info("ModernBERT: %s attention replaced by sdpa (offramp runs the padded path)",
                     model.config._attn_implementation)
            model.set_attn_implementation("sdpa")
        super().__init__(model)
        self.base = model.model

    @property
    def modules(self):
        return self.base.layers

    def embed(self, input_ids, token_type_ids):
        return self.base.embeddings(input_ids=input_ids)

    def layer_state(self, hidden, mask):
        from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

        kw = dict(config=self.config, inputs_embeds=hidden, attention_mask=mask, allow_is_bidirectional_skip=False)
        masks = {"full_attention": create_bidirectional_mask(**kw),
                 "sliding_attention": create_bidirectional_sliding_window_mask(**kw)}
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {t: self.base.rotary_emb(hidden, positions, t) for t in set(self.config.layer_types)}
        return _State(masks, rotary)

    def layer(self, i, hidden, state):
        kind = self.config.layer_types[i]
        return self.base.layers[i](hidden, attention_mask=state.masks[kind], position_embeddings=state.rotary[kind])

    def head(self, hidden, mask):
        hidden = self.base.final_norm(hidden)
        if self.config.classifier_pooling == "cls":
            pooled = hidden[:, 0]
        else:  # "mean" over real tokens, as the model's own forward computes it
            pooled = (hidden * mask.unsqueeze(-1)).sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return self.model.classifier(self.model.drop(self.model.head(pooled)))
