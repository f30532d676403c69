"""DistilBERT: no token types; the head is pre_classifier + ReLU on the first token."""
from __future__ import annotations

import torch

from pipeline.model.families.base import Backbone, register


@register("DistilBertForSequenceClassification")
class DistilBert(Backbone):
    family = "distilbert"

    @property
    def hidden_size(self) -> int:
        return int(self.config.dim)

    @property
    def modules(self):
        return self.model.distilbert.transformer.layer

    def embed(self, input_ids, token_type_ids):
        return self.model.distilbert.embeddings(input_ids)

    def head(self, hidden, mask):
        pooled = torch.relu(self.model.pre_classifier(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))
