"""Token-budget micro-batching, shared by the offline and online paths.

Rows are sorted by token length and cut into micro-batches whose padded size
(rows x longest row) stays under a token budget; results are put back in the caller's order.
Sorting alone roughly halves padding on sentence corpora (input-order batches of 64 pad to ~2x).
"""
from __future__ import annotations

from collections import deque

import numpy as np


class MicroBatchQueue:
    """Rows sorted longest first, cut into micro-batches one at a time, each at the token budget passed to
    `pop`: a budget that adapts during a call (one offline call is a whole shard) shapes the rest of it.

    Every row comes out once, and again each time `retry_first` hands it back: retries come out next, as
    given (not re-cut). `pop` on an empty queue raises IndexError."""

    def __init__(self, lengths, max_rows: int, multiple: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.order = np.argsort(-self.lengths, kind="stable")
        self.max_rows = int(max_rows)
        self.multiple = int(multiple)
        """Micro-batches of at least this many rows hold a multiple of it (fewer distinct shapes)."""
        self._next = 0
        self._retry: deque[np.ndarray] = deque()

    def __bool__(self) -> bool:
        return bool(self._retry) or self._next < len(self.order)

    def pop(self, token_budget: int) -> np.ndarray:
        """The next micro-batch's row indices: a pushed-back retry first, else the longest rows left."""
        if self._retry:
            return self._retry.popleft()
        longest = max(int(self.lengths[self.order[self._next]]), 1)
        rows = max(1, min(self.max_rows, token_budget // longest))
        if rows >= self.multiple:
            rows -= rows % self.multiple
        batch = self.order[self._next : self._next + rows]
        self._next += len(batch)
        return batch

    def retry_first(self, batches: list[np.ndarray]) -> None:
        """Run these row sets next, in this order (a failed micro-batch cut smaller)."""
        self._retry.extendleft(reversed(batches))


def plan_microbatches(lengths, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Indices into `lengths` for each micro-batch at a fixed budget, longest rows first.

    Every row lands in exactly one micro-batch; a single row longer than the budget gets its own.
    """
    queue = MicroBatchQueue(lengths, max_rows)
    batches = []
    while queue:
        batches.append(queue.pop(token_budget))
    return batches


class TokenBudget:
    """Adapts the micro-batch token budget: grow while under the latency target, halve on OOM. After an OOM
    the budget never grows back to within one growth step of that size, for the object's life: the device
    that ran out of memory there would again (else it would climb back and fail every few micro-batches)."""

    def __init__(self, initial: int, maximum: int, latency_target_s: float, minimum: int = 16):
        self.value = int(initial)
        self.maximum = int(maximum)
        self.minimum = int(minimum)
        self.latency_target_s = float(latency_target_s)
        self.ooms = 0

    def observe(self, tokens: int, seconds: float) -> None:
        # Only a micro-batch that filled the budget says anything about a bigger one.
        if tokens >= 0.75 * self.value and seconds < 0.5 * self.latency_target_s:
            self.value = min(self.maximum, int(self.value * 1.25))
        elif seconds > self.latency_target_s and self.value > self.minimum:
            self.value = max(self.minimum, int(self.value * 0.8))

    def on_oom(self, tokens: int) -> bool:
        """A micro-batch of `tokens` (rows x longest row) ran out of memory: halve; False when already at the
        floor (the caller must give up on the row)."""
        self.ooms += 1
        self.maximum = max(self.minimum, min(self.maximum, int(tokens / 1.25)))
        if self.value <= self.minimum:
            return False
        self.value = max(self.minimum, min(self.maximum, self.value // 2))
        return True
