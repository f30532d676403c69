"""The one optimisation loop fine-tuning and distillation share: AdamW, linear warm-up then decay,
gradient clipping, a fixed number of steps over repeated epochs."""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def train_steps(model: torch.nn.Module, epoch_batches: Callable[[], Iterable], loss_of: Callable[[object], torch.Tensor],
                total: int, learning_rate: float, progress=None, after_step: Callable[[int], None] | None = None) -> int:
    """Run `total` steps; `epoch_batches()` yields one epoch of batches, `loss_of(batch)` their loss;
    `after_step(step)` after each (the model in train mode again once it returns)."""
    from transformers import get_linear_schedule_with_warmup

    opt = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=max(1, total // 10), num_training_steps=total)
    step = 0
    model.train()
    while step < total:
        for batch in epoch_batches():
            loss = loss_of(batch)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if progress:
                progress(step, total, float(loss.detach()))
            if after_step:
                after_step(step)
                model.train()
            if step >= total:
                break
    model.eval()
    return step
