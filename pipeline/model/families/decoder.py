"""Decoder classifiers (transformers' GenericForSequenceClassification: Llama, Qwen2/3, Mistral, Gemma...): the
shared mechanics; each family's module registers a subclass (llama.py, qwen.py, mistral.py, gemma.py).

What differs from an encoder:
- attention is causal, plus the padding mask, and some layers see only a sliding window: one mask per layer type,
  made by transformers' own masking_utils as the model's forward makes them;
- rotary position tables for positions 0..S-1 (rows are right-padded, so every row starts at position 0);
- the model's final norm, then the `score` head at each row's last real token. The model finds that token as the
  rightmost input id != pad_token_id; here it is mask.sum(1) - 1, the same for right-padded rows whose text does not
  end in the pad token (a checkpoint whose pad token is its EOS, with the tokenizer appending EOS, is read one token
  later than the model reads it; the model's own reading there is a quirk of using EOS as padding).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.model.families.base import Backbone


class _State(NamedTuple):
    masks: dict[str, torch.Tensor]  # layer type -> 4D mask (or what the attention implementation takes)
    rotary: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin) [1,S,head_dim]
    positions: torch.Tensor  # [1,S]


class Decoder(Backbone):
    ramp_pooling = "last"
    half_dtype = "bfloat16"  # trained in bf16: fp16 activations can overflow

    def __init__(self, model):
        super().__init__(model)
        self.base = model.model

    @property
    def modules(self):
        return self.base.layers

    @property
    def layer_types(self) -> list[str]:
        """Each layer's attention type, as the model's forward picks its mask."""
        types = getattr(self.config, "layer_types", None)
        return list(types) if types else ["full_attention"] * self.config.num_hidden_layers

    def rotary(self, hidden, positions) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer type: one table for every layer here (Gemma 3 has one per type)."""
        table = self.base.rotary_emb(hidden, positions)
        return {t: table for t in set(self.layer_types)}

    def embed(self, input_ids, token_type_ids):
        return self.base.embed_tokens(input_ids)  # Gemma's scaling by sqrt(hidden) is inside its embedding module

    def layer_state(self, hidden, mask):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        make = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        # allow_is_causal_skip=False: always a mask tensor, never None (a compiled layer shown both compiles twice)
        masks = {t: make[t](config=self.config, inputs_embeds=hidden, attention_mask=mask, cache=None,
                            position_ids=positions, allow_is_causal_skip=False) for t in set(self.layer_types)}
        return _State(masks, self.rotary(hidden, positions), positions)

    def layer(self, i, hidden, state):
        kind = self.layer_types[i]
        return self.base.layers[i](hidden, attention_mask=state.masks[kind], position_embeddings=state.rotary[kind],
                                   position_ids=state.positions)

    def head(self, hidden, mask):
        last = mask.long().sum(1) - 1  # [B] each row's last real token
        hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(self.base.norm(hidden))
