"""Token-budget micro-batching, shared by the offline and online paths.

Rows are sorted by token length and cut into micro-batches whose padded size
(rows x longest row) stays under a token budget; results are put back in the caller's order.
Sorting alone roughly halves padding on sentence corpora (input-order batches of 64 pad to ~2x).
"""
from __future__ import annotations

import numpy as np


def plan_microbatches(lengths, token_budget: int, max_rows: int) -> list[np.ndarray]:
    """Indices into `lengths` for each micro-batch, longest rows first.

    Every row lands in exactly one micro-batch; a single row longer than the budget gets its own.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        rows = max(1, min(max_rows, token_budget // longest))
        batches.append(order[start : start + rows])
        start += rows
    return batches


class TokenBudget:
    """Adapts the micro-batch token budget: grow while under the latency target, halve on OOM."""

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

    def on_oom(self) -> bool:
        """Halve; False when already at the floor (the caller must give up on the row)."""
        self.ooms += 1
        if self.value <= self.minimum:
            return False
        self.value = max(self.minimum, self.value // 2)
        return True
