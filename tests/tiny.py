"""Tiny random encoder classifiers built in the tests (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 30522  # the packaged MiniLM tokenizer's vocabulary, so saved tiny models can use it


def tiny_classifier(family: str = "bert", num_layers: int = 4, num_labels: int = 2, seed: int = 0):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, num_labels=num_labels, max_position_embeddings=128)
    if family == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                         intermediate_size=64, **common)
        model = BertForSequenceClassification(cfg)
    elif family == "distilbert":
        cfg = DistilBertConfig(dim=32, n_layers=num_layers, n_heads=2, hidden_dim=64, **common)
        model = DistilBertForSequenceClassification(cfg)
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
                            intermediate_size=64, pad_token_id=0, **common)
        model = RobertaForSequenceClassification(cfg)
    else:
        raise ValueError(family)
    return model.eval()


def save_tiny(path, family: str = "bert", num_layers: int = 4, num_labels: int = 2, seed: int = 0) -> str:
    """A tiny classifier saved like a user's model: safetensors + the packaged MiniLM tokenizer."""
    from pipeline.model.artifact import load_tokenizer

    model = tiny_classifier(family, num_layers, num_labels, seed)
    model.config.id2label = {i: f"class{i}" for i in range(num_labels)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return str(path)
