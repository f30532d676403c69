"""Length-sorted padded batches of tokenized rows: rows of similar length share a batch, so little compute goes
to padding. Numpy only (the ONNX peer uses it without torch); callers wrap the arrays as tensors."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 1,
             limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Input ids and attention mask, both int64 [B, W], right-padded to the longest row, rounded up to a
    `multiple` of columns (at most `limit`, the model's longest input)."""
    longest = max((len(r) for r in rows), default=0)
    width = max(longest, min(-(-longest // multiple) * multiple, limit or 10**9))
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def padded_batches(rows: Sequence[Sequence[int]], pad_id: int,
                   batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row indices, ids, mask) for each batch of at most `batch_size` rows, shortest rows first; every row once."""
    order = np.argsort([len(r) for r in rows], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield (idx, *pad_rows([rows[i] for i in idx], pad_id))
