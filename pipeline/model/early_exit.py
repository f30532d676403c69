"""The early-exit model: an HF sequence classifier plus ramps, callable one piece at a time.

This module only computes. Which rows exit, and when, is decided outside it by an ExitPolicy
(pipeline.engine.policy) inside the executor loop (pipeline.engine.executor); what an answer is, by the
head's kind (pipeline.model.heads).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.model.families import Backbone, backbone
from pipeline.model.heads import HeadKind, head_kind
from pipeline.model.ramps import RampSet

# SDPA on CUDA without its cuDNN backend: cuDNN attention builds an execution plan for every new
# (batch, length) shape, and micro-batches (and the rows left after each exit) change shape all the time.
# Measured on an H200 (torch 2.11), 4,096 rows on fresh shapes: 0.34 s median per micro-batch against 0.047 s
# without cuDNN, and the adaptive token budget shrank from 8,192 to 73 tokens. The memory-efficient kernel
# takes padding masks and needs no per-shape plan. (sdpa_kernel sets process-wide flags: the layers of one
# model run on one thread at a time, in the offline actor and in the Serve replica's worker thread.)
_CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(hidden: torch.Tensor):
    """The context every layer runs in: on CUDA, SDPA without its cuDNN backend (see _CUDA_ATTENTION)."""
    return sdpa_kernel(_CUDA_ATTENTION) if hidden.is_cuda else nullcontext()


class EarlyExitModel(nn.Module):
    def __init__(self, hf_model, ramps: RampSet, head: HeadKind | None = None):
        super().__init__()
        self.hf_model = hf_model.eval()
        self.parts: Backbone = backbone(hf_model)
        self.ramps = ramps
        self.head_kind = head or head_kind(hf_model.config)
        self.num_labels = int(hf_model.config.num_labels)
        check_ramps_match(ramps, self.parts, self.head_kind.ramp_outputs)
        self.ramp_at_layer = ramps.at_layer()

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def config(self):
        return self.hf_model.config

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.parts.embed(input_ids, token_type_ids)  # [B,S,H]

    def layer_state(self, hidden: torch.Tensor, mask: torch.Tensor):
        """What every layer needs for these rows besides hidden [B,S,H] (the attention mask in the form the
        attention implementation wants, a family's rotary tables or relative positions), from mask [B,S].
        Computed again whenever the rows change."""
        return self.parts.layer_state(hidden, mask)

    def layer(self, i: int, hidden: torch.Tensor, state) -> torch.Tensor:
        """Run layer i (0-based); on CUDA without SDPA's cuDNN backend (see _CUDA_ATTENTION)."""
        with attention_kernels(hidden):
            return self.parts.layer(i, hidden, state)

    def ramp(self, r: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ramps.ramps[r](hidden, mask)  # [B,ramp_outputs]

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.parts.head(hidden, mask)  # [B,C]

    @torch.inference_mode()
    def full_forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """No exits: the original model's logits, computed layer by layer."""
        h = self.embed(input_ids, token_type_ids)
        state = self.layer_state(h, attention_mask)
        for i in range(self.num_layers):
            h = self.layer(i, h, state)
        return self.head(h, attention_mask)


def check_ramps_match(ramps: RampSet, parts: Backbone, num_outputs: int) -> None:
    """A ramps file from another model must fail loudly, not produce garbage."""
    n = parts.num_layers
    if ramps.layers[-1] > n:
        raise ValueError(
            f"ramp at layer {ramps.layers[-1]} but the model has {n} layers: these ramps belong to another "
            "model; run `offramp bootstrap` for this one"
        )
    first = ramps.ramps[0]
    if first.norm.normalized_shape[0] != parts.hidden_size or first.proj.out_features != num_outputs:
        raise ValueError(
            f"ramps expect hidden size {first.norm.normalized_shape[0]} and {first.proj.out_features} outputs, "
            f"the model has {parts.hidden_size} and its head's ramps {num_outputs}: these ramps belong to another "
            "model; "
            "run `offramp bootstrap` for this one"
        )
