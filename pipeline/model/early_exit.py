"""The early-exit model: an HF encoder classifier plus ramps, callable one piece at a time.

This module only computes. Which rows exit, and when, is decided outside it by an ExitPolicy
(pipeline.engine.policy) inside the executor loop (pipeline.engine.executor).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.model.encoders import EncoderParts, encoder_parts
from pipeline.model.ramps import RampSet

# SDPA on CUDA without its cuDNN backend: cuDNN attention builds an execution plan for every new
# (batch, length) shape, and micro-batches (and the rows left after each exit) change shape all the time.
# Measured on an H200 (torch 2.11), 4,096 rows on fresh shapes: 0.34 s median per micro-batch against 0.047 s
# without cuDNN, and the adaptive token budget shrank from 8,192 to 73 tokens. The memory-efficient kernel
# takes padding masks and needs no per-shape plan. (sdpa_kernel sets process-wide flags: the layers of one
# model run on one thread at a time, in the offline actor and in the Serve replica's worker thread.)
_CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class EarlyExitModel(nn.Module):
    def __init__(self, hf_model, ramps: RampSet):
        super().__init__()
        self.hf_model = hf_model.eval()
        self.parts: EncoderParts = encoder_parts(hf_model)
        self.ramps = ramps
        self.num_labels = int(hf_model.config.num_labels)
        check_ramps_match(ramps, self.parts, self.num_labels)
        self.ramp_at_layer = ramps.at_layer()

    @property
    def num_layers(self) -> int:
        return len(self.parts.layers)

    @property
    def config(self):
        return self.hf_model.config

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts.embed(input_ids, token_type_ids)  # [B,S,H]

    def layer_mask(self, hidden: torch.Tensor, mask: torch.Tensor):
        """2D padding mask [B,S] -> whatever the attention implementation wants. Always a mask, even when no
        row is padded: a compiled layer that sees None for some batches compiles a second graph."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask,
                                         allow_is_bidirectional_skip=False)

    def layer(self, i: int, hidden: torch.Tensor, layer_mask) -> torch.Tensor:
        """Run encoder layer i (0-based); on CUDA without SDPA's cuDNN backend (see _CUDA_ATTENTION)."""
        with sdpa_kernel(_CUDA_ATTENTION) if hidden.is_cuda else nullcontext():
            out = self.parts.layers[i](hidden, layer_mask)
        return out[0] if isinstance(out, tuple) else out

    def ramp(self, r: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ramps.ramps[r](hidden, mask)  # [B,C]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.parts.head(hidden)  # [B,C]

    @torch.inference_mode()
    def full_forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """No exits: the original model's logits, computed layer by layer."""
        h = self.embed(input_ids, token_type_ids)
        m = self.layer_mask(h, attention_mask)
        for i in range(self.num_layers):
            h = self.layer(i, h, m)
        return self.head(h)


def check_ramps_match(ramps: RampSet, parts: EncoderParts, num_labels: int) -> None:
    """A ramps file from another model must fail loudly, not produce garbage."""
    n = len(parts.layers)
    if ramps.layers[-1] > n:
        raise ValueError(
            f"ramp at layer {ramps.layers[-1]} but the model has {n} layers: these ramps belong to another "
            "model; run `offramp bootstrap` for this one"
        )
    first = ramps.ramps[0]
    if first.norm.normalized_shape[0] != parts.hidden_size or first.proj.out_features != num_labels:
        raise ValueError(
            f"ramps expect hidden size {first.norm.normalized_shape[0]} and {first.proj.out_features} classes, "
            f"the model has {parts.hidden_size} and {num_labels}: these ramps belong to another model; "
            "run `offramp bootstrap` for this one"
        )
