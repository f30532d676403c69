"""ALBERT: `num_hidden_groups` layer groups (usually one) shared across `num_hidden_layers` applications.

A step (and a ramp) is one application; `layers` repeats the shared group, `modules` holds each group once, so a
compression transform changes a shared group once and every application sees it.
"""
from __future__ import annotations

from pipeline.model.families.base import Backbone, register


@register("AlbertForSequenceClassification")
class Albert(Backbone):
    family = "albert"

    def __init__(self, model):
        super().__init__(model)
        self.albert = model.albert

    @property
    def modules(self):
        return self.albert.encoder.albert_layer_groups

    @property
    def layers(self):
        n, groups = self.config.num_hidden_layers, self.config.num_hidden_groups
        # the group index AlbertTransformer.forward uses for application i
        return [self.modules[int(i / (n / groups))] for i in range(n)]

    def embed(self, input_ids, token_type_ids):
        hidden = self.albert.embeddings(input_ids, token_type_ids=token_type_ids)  # [B,S,embedding_size]
        return self.albert.encoder.embedding_hidden_mapping_in(hidden)

    def head(self, hidden, mask):
        pooled = self.albert.pooler_activation(self.albert.pooler(hidden[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))
