"""ELECTRA (discriminator classifiers): BERT-like layers; small checkpoints embed in a narrower size
(`embedding_size`) that `embeddings_project` maps up to the hidden size; the head reads the first token."""
from __future__ import annotations

from pipeline.model.families.base import Backbone, register


@register("ElectraForSequenceClassification")
class Electra(Backbone):
    family = "electra"

    def __init__(self, model):
        super().__init__(model)
        if getattr(model.config, "is_decoder", False):
            raise ValueError("an ELECTRA config with is_decoder=True (causal attention) is not supported: offramp "
                             "needs the bidirectional encoder the classifier was trained as")
        self.electra = model.electra

    @property
    def modules(self):
        return self.electra.encoder.layer

    def embed(self, input_ids, token_type_ids):
        hidden = self.electra.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        # the model has the attribute only when embedding_size != hidden_size
        project = getattr(self.electra, "embeddings_project", None)
        return hidden if project is None else project(hidden)

    def head(self, hidden, mask):
        return self.model.classifier(hidden)
