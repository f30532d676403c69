"""RoBERTa and XLM-R (same classes in transformers): position ids start after the padding index, which the
embeddings compute from input_ids themselves; the head is a dense + tanh on the first token."""
from __future__ import annotations

from pipeline.model.families.base import Backbone, register


@register("RobertaForSequenceClassification", "XLMRobertaForSequenceClassification")
class Roberta(Backbone):
    family = "roberta"

    @property
    def modules(self):
        return self.model.roberta.encoder.layer

    def embed(self, input_ids, token_type_ids):
        return self.model.roberta.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def head(self, hidden, mask):
        return self.model.classifier(hidden)
