"""The interface every model family implements, and the registry keyed by the transformers class.

The early-exit model steps through a classifier one piece at a time: embeddings, then each layer, then the
original head. A family is one small module (bert.py, deberta_v2.py, ...) with a `Backbone` subclass that
knows where those pieces are in its transformers class and what per-batch state its layers need
(an attention mask, rotary tables, relative positions: computed once per set of rows by `layer_state`).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn

_FAMILIES: dict[str, type["Backbone"]] = {}


def register(*class_names: str) -> Callable[[type["Backbone"]], type["Backbone"]]:
    """Class decorator: this Backbone serves these transformers `...ForSequenceClassification` classes."""

    def add(cls: type[Backbone]) -> type[Backbone]:
        for name in class_names:
            if name in _FAMILIES:
                raise ValueError(f"{name} is already served by {_FAMILIES[name].__name__}")
            _FAMILIES[name] = cls
        return cls

    return add


def supported_classes() -> list[str]:
    """The transformers classes offramp can step through, sorted."""
    return sorted(_FAMILIES)


def half_dtype_of(family: str) -> str:
    """The half precision a family runs in on a GPU (`Backbone.half_dtype`), by its `family` name."""
    for cls in _FAMILIES.values():
        if cls.family == family:
            return cls.half_dtype
    return Backbone.half_dtype


def backbone(model: nn.Module) -> "Backbone":
    """The Backbone of an HF sequence classifier; a clear refusal for any other class."""
    name = type(model).__name__
    cls = _FAMILIES.get(name)
    if cls is None:
        raise ValueError(f"{name} is not supported; offramp steps through these sequence classifiers: "
                         f"{', '.join(supported_classes())}")
    return cls(model)


class Backbone:
    """One HF sequence classifier as the pieces the early-exit model runs, in order:
    `embed` -> `layer_state` -> `layer(i)` for i in 0..num_layers-1 -> `head`.

    Hidden states are [B,S,H]; `mask` is the 2D padding mask [B,S] (1 = real token), always right-padded
    (the executor drops trailing columns as rows leave, and calls `layer_state` again for the rows left)."""

    family: ClassVar[str]
    ramp_pooling: ClassVar[str] = "mean"
    """How ramps bootstrapped on this family pool a layer's tokens by default (pipeline.model.ramps.pool)."""
    half_dtype: ClassVar[str] = "float16"
    """The 16-bit dtype this family runs in when an engine on a GPU is asked for half precision: float16 by default;
    bfloat16 for families trained in bf16 (the decoder classifiers), whose activations can exceed float16's range
    (max 65504) and turn into inf / NaN."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- what a subclass must say ----------------------------------------------------------------
    @property
    def modules(self) -> nn.ModuleList:
        """The distinct layer modules, as the classifier holds them (compression and distillation work on
        these)."""
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        """input_ids [B,S] (and token_type_ids [B,S] or None) -> hidden [B,S,H]."""
        raise NotImplementedError

    def head(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden [B,S,H] -> logits [B,C], exactly the classifier's own head (eval mode)."""
        raise NotImplementedError

    # -- defaults that fit BERT-like encoders ----------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layers(self) -> list[nn.Module]:
        """The module run at each step (ALBERT: the one shared group, num_hidden_layers times)."""
        return list(self.modules)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_state(self, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
        """What every layer needs besides the hidden states, for these rows: here the attention mask in the
        form the configured attention implementation wants. Always a mask, even when no row is padded: a
        compiled layer that sees None for some batches compiles a second graph."""
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask,
                                         allow_is_bidirectional_skip=False)

    def layer(self, i: int, hidden: torch.Tensor, state: Any) -> torch.Tensor:
        """Layer i (0-based) on hidden [B,S,H] with this batch's `layer_state`."""
        out = self.layers[i](hidden, state)
        return out[0] if isinstance(out, tuple) else out
