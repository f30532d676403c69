"""DeBERTa-v2/v3 and mDeBERTa (one transformers class): disentangled attention with relative positions.

The encoder computes, once per forward, what every layer shares: the relative position ids (log-bucketed),
the relative position embeddings (LayerNorm-ed when `norm_rel_ebd` says so), and its own [B,1,S,S] mask
(query real AND key real). Here `layer_state` computes the same for the rows and columns at hand.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.model.families.base import Backbone, register


class _State(NamedTuple):
    mask: torch.Tensor  # [B,S] long: ConvLayer computes 1 - mask
    pair_mask: torch.Tensor  # [B,1,S,S]
    relative_pos: torch.Tensor | None  # [1,S,S]
    rel_embeddings: torch.Tensor | None  # [2*span,H]


@register("DebertaV2ForSequenceClassification")
class DebertaV2(Backbone):
    family = "deberta_v2"

    def __init__(self, model):
        super().__init__(model)
        self.encoder = model.deberta.encoder

    @property
    def modules(self):
        return self.encoder.layer

    def embed(self, input_ids, token_type_ids):
        # The model's embeddings also zero padded positions (their `mask` argument); that needs the mask, so layer 0
        # does it (see `layer`).
        return self.model.deberta.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def layer_state(self, hidden, mask):
        mask = mask.long()
        return _State(mask, self.encoder.get_attention_mask(mask), self.encoder.get_rel_pos(hidden),
                      self.encoder.get_rel_embedding())

    def layer(self, i, hidden, state):
        if i == 0:  # the embeddings' own masking: ConvLayer below reads padded neighbours of real tokens
            hidden = hidden * state.mask.unsqueeze(-1).to(hidden.dtype)
        out = self.encoder.layer[i](hidden, state.pair_mask, relative_pos=state.relative_pos,
                                    rel_embeddings=state.rel_embeddings)[0]
        if i == 0 and self.encoder.conv is not None:  # v2's convolution branch: the first layer's input and output
            out = self.encoder.conv(hidden, out, state.mask)
        return out

    def head(self, hidden, mask):
        return self.model.classifier(self.model.dropout(self.model.pooler(hidden)))
