"""MPNet: a relative-position attention bias [B,heads,S,S], computed once per forward by the encoder and added in
every layer; positions in the embeddings start after the padding index (1), like RoBERTa's; the head is a
dense + tanh on the first token."""
from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.model.families.base import Backbone, register


class _State(NamedTuple):
    mask: torch.Tensor  # what create_bidirectional_mask gives (MPNet runs eager attention: an additive float mask)
    position_bias: torch.Tensor  # [B,heads,S,S]


@register("MPNetForSequenceClassification")
class MPNet(Backbone):
    family = "mpnet"

    def __init__(self, model):
        super().__init__(model)
        self.mpnet = model.mpnet

    @property
    def modules(self):
        return self.mpnet.encoder.layer

    def embed(self, input_ids, token_type_ids):
        return self.mpnet.embeddings(input_ids=input_ids)

    def layer_state(self, hidden, mask):
        # as MPNetEncoder.forward calls it: its default 32 buckets, not config.relative_attention_num_buckets
        return _State(super().layer_state(hidden, mask), self.mpnet.encoder.compute_position_bias(hidden))

    def layer(self, i, hidden, state):
        return self.mpnet.encoder.layer[i](hidden, state.mask, state.position_bias)[0]

    def head(self, hidden, mask):
        return self.model.classifier(hidden)
