"""Ramps: lightweight exit heads at cut points (after encoder layers).

A ramp maps a layer's hidden state to logits: pooled hidden (masked mean over real tokens, the first
token, or the last real token for decoder classifiers) -> LayerNorm -> Linear. Its outputs are what the
head's kind asks of a ramp (pipeline.model.heads: class logits, or bins of a regression score). Its cost
is a reduction over [B,S,H] plus an H x C matmul, far under 1% of an encoder layer (DeeBERT reuses the whole
pooler and costs ~20%).
"""
from __future__ import annotations

import torch
from torch import nn

POOLINGS = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """hidden [B,S,H], mask [B,S] (1 = real token, right-padded) -> [B,H]."""
    if kind == "cls":
        return hidden[:, 0]
    if kind == "last":  # a decoder's summary token: the last real one (where its score head reads)
        last = mask.long().sum(1).clamp_min(1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    m = mask.to(hidden.dtype).unsqueeze(-1)  # [B,S,1]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class Ramp(nn.Module):
    def __init__(self, hidden_size: int, num_outputs: int, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"ramp pooling {pooling!r} must be one of {POOLINGS}")
        self.pooling = pooling
        self.norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, num_outputs)

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(pooled))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(pool(hidden, mask, self.pooling))


class RampSet(nn.Module):
    """Ramp r sits after encoder layer `layers[r]` (1-based: after layer 1 means after the first layer)."""

    def __init__(self, layers: list[int], hidden_size: int, num_outputs: int, pooling: str | list[str] = "mean"):
        super().__init__()
        if list(layers) != sorted(set(layers)) or not layers or layers[0] < 1:
            raise ValueError(f"ramp layers {layers} must be distinct, increasing and >= 1")
        poolings = [pooling] * len(layers) if isinstance(pooling, str) else list(pooling)
        self.layers = list(layers)
        self.ramps = nn.ModuleList(Ramp(hidden_size, num_outputs, p) for p in poolings)

    def __len__(self) -> int:
        return len(self.ramps)

    def at_layer(self) -> dict[int, int]:
        """encoder layer (1-based) -> ramp index"""
        return {layer: r for r, layer in enumerate(self.layers)}
