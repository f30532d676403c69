"""Logits of a plain Hugging Face classifier over many texts: the original model, as the audits, the
compression check and distillation run it."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pipeline.data.batching import padded_batches


@torch.inference_mode()
def logits_of_rows(model, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64,
                   progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Float32 logits [N, C] on the CPU, in input order, of pre-tokenized rows run on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.config.num_labels)
    done = 0
    for idx, ids, mask in padded_batches(rows, pad_id, batch_size):
        logits = model(input_ids=torch.from_numpy(ids).to(device), attention_mask=torch.from_numpy(mask).to(device))
        out[torch.from_numpy(idx)] = logits.logits.float().cpu()
        done += len(idx)
        if progress:
            progress(done, len(rows))
    return out


def classifier_logits(model, tokenizer, texts: Sequence[str], max_length: int, batch_size: int = 64,
                      progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`logits_of_rows` of texts, truncated to `max_length` tokens."""
    rows = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return logits_of_rows(model, rows, tokenizer.pad_token_id or 0, batch_size, progress)
