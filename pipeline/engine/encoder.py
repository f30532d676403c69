"""Validation and tokenization: texts in, token ids (or a per-row error) out.

Kept apart from the model and free of torch, so the offline job's tokenize tasks start in a fraction of
the time a model process needs (they run ahead of the early-exit actors, on the same CPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from pipeline.data.texts import validate_text


@dataclass
class Encoded:
    """Tokenized rows: ids per row ([] where the row has an error), truncated flags, per-row errors."""

    input_ids: list[list[int]]
    truncated: np.ndarray
    errors: list[str | None]

    def __len__(self) -> int:
        return len(self.input_ids)


class TextEncoder:
    """Validation + tokenization, separable from the model so Ray tasks can tokenize ahead of the actors.

    Runs on the `tokenizers` library: a transformers fast tokenizer's backend (copied, so the truncation
    set here stays here) or an artifact's tokenizer.json, cutting long texts on the tokenizer's
    truncation side. A tokenizer without one (a slow, Python tokenizer) is called through transformers."""

    def __init__(self, tokenizer, max_length: int, truncation_side: str | None = None):
        self.max_length = int(max_length)
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        self.tokenizer = tokenizer if backend is None else None  # the slow path only
        self.backend = None
        if backend is not None:
            side = truncation_side or getattr(tokenizer, "truncation_side", None) or "right"
            self.backend = Tokenizer.from_str(backend.to_str())
            self.backend.no_padding()
            # truncated rows keep the cut in `overflowing`
            self.backend.enable_truncation(self.max_length, direction=side)

    @classmethod
    def from_artifact(cls, artifact: str, max_length: int | None = None) -> "TextEncoder":
        """Read only tokenizer.json and the configs when the artifact has them: no torch and no transformers
        to import, so a tokenize task is ready in a fraction of a second instead of about 2 s."""
        import json
        from types import SimpleNamespace

        from pipeline.model.artifact import artifact_dir, load_tokenizer, model_max_length

        model = artifact_dir(artifact) / "model"  # a URL: this node's cached copy
        side = None
        if (model / "tokenizer.json").exists() and (model / "config.json").exists():
            tok = Tokenizer.from_file(str(model / "tokenizer.json"))
            path = model / "tokenizer_config.json"
            tok_config = json.loads(path.read_text()) if path.exists() else {}
            side = tok_config.get("truncation_side")
            # config.json as saved (save_pretrained writes max_position_embeddings and model_type)
            config = SimpleNamespace(**json.loads((model / "config.json").read_text()))
            limit = model_max_length(config, SimpleNamespace(**tok_config))
        else:
            from transformers import AutoConfig

            tok = load_tokenizer(str(model))
            limit = model_max_length(AutoConfig.from_pretrained(str(model)), tok)
        return cls(tok, min(max_length or limit, limit), side)

    def encode(self, texts: list) -> Encoded:
        errors = [validate_text(t) for t in texts]
        valid = [i for i, e in enumerate(errors) if e is None]
        ids: list[list[int]] = [[] for _ in texts]
        truncated = np.zeros(len(texts), bool)
        if valid and self.backend is not None:
            for i, e in zip(valid, self.backend.encode_batch([texts[i] for i in valid])):
                ids[i] = e.ids
                truncated[i] = bool(e.overflowing)
        elif valid:
            enc = self.tokenizer([texts[i] for i in valid], truncation=True, max_length=self.max_length,
                                 padding=False)["input_ids"]
            for i, e in zip(valid, enc):
                ids[i] = e
                if len(e) >= self.max_length:  # maybe cut: check the untruncated length
                    full = self.tokenizer(texts[i], truncation=False, verbose=False)["input_ids"]
                    truncated[i] = len(full) > self.max_length
        return Encoded(ids, truncated, errors)

