"""Per-family access to an HF sequence classifier's pieces: embeddings, encoder layers, head.

The early-exit model steps through `layers` one at a time, so it needs these three pieces and
nothing else. Supported: BERT (incl. MiniLM), DistilBERT, RoBERTa (incl. XLM-R via the same classes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class EncoderParts:
    family: str
    embed: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    """(input_ids [B,S], token_type_ids [B,S] or None) -> hidden [B,S,H]"""
    layers: nn.ModuleList
    head: Callable[[torch.Tensor], torch.Tensor]
    """final hidden [B,S,H] -> logits [B,C], exactly the original classifier's head (eval mode)."""
    hidden_size: int


def _bert(model) -> EncoderParts:
    bert = model.bert

    def head(h: torch.Tensor) -> torch.Tensor:
        pooled = bert.pooler(h) if bert.pooler is not None else h[:, 0]
        return model.classifier(model.dropout(pooled))

    return EncoderParts(
        "bert",
        lambda ids, tt: bert.embeddings(input_ids=ids, token_type_ids=tt),
        bert.encoder.layer,
        head,
        model.config.hidden_size,
    )


def _distilbert(model) -> EncoderParts:
    db = model.distilbert

    def head(h: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(model.pre_classifier(h[:, 0]))
        return model.classifier(model.dropout(pooled))

    return EncoderParts("distilbert", lambda ids, tt: db.embeddings(ids), db.transformer.layer, head, model.config.dim)


def _roberta(model) -> EncoderParts:
    rob = model.roberta
    return EncoderParts(
        "roberta",
        lambda ids, tt: rob.embeddings(input_ids=ids, token_type_ids=tt),
        rob.encoder.layer,
        model.classifier,
        model.config.hidden_size,
    )


_FAMILIES = {
    "BertForSequenceClassification": _bert,
    "DistilBertForSequenceClassification": _distilbert,
    "RobertaForSequenceClassification": _roberta,
    "XLMRobertaForSequenceClassification": _roberta,
}


def encoder_parts(model) -> EncoderParts:
    name = type(model).__name__
    if name not in _FAMILIES:
        raise ValueError(
            f"{name} is not supported; offramp steps through BERT, DistilBERT and RoBERTa sequence "
            f"classifiers ({', '.join(_FAMILIES)})"
        )
    if getattr(model.config, "is_decoder", False):
        raise ValueError("decoder (causal) configs are not supported: offramp needs a bidirectional encoder")
    return _FAMILIES[name](model)
