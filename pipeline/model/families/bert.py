"""BERT (MiniLM and other BERT checkpoints): the pooler (when the checkpoint has one) feeds the classifier."""
from __future__ import annotations

from pipeline.model.families.base import Backbone, register


@register("BertForSequenceClassification")
class Bert(Backbone):
    family = "bert"

    def __init__(self, model):
        super().__init__(model)
        if getattr(model.config, "is_decoder", False):
            raise ValueError("a BERT config with is_decoder=True (causal attention) is not supported: offramp needs "
                             "the bidirectional encoder the classifier was trained as")
        self.bert = model.bert

    @property
    def modules(self):
        return self.bert.encoder.layer

    def embed(self, input_ids, token_type_ids):
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def head(self, hidden, mask):
        pooled = self.bert.pooler(hidden) if self.bert.pooler is not None else hidden[:, 0]
        return self.model.classifier(self.model.dropout(pooled))
