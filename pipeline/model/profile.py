"""Latency profile of each piece of an early-exit model on the current device (the controller's cost model)."""
from __future__ import annotations

import time

import numpy as np
import torch

from pipeline.model.artifact import Profile
from pipeline.model.early_exit import EarlyExitModel


def _time_ms(fn, reps: int, device: torch.device) -> float:
    samples = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t) * 1000)
    return float(np.median(samples[1:]))  # first call warms caches


@torch.inference_mode()
def measure_profile(model: EarlyExitModel, batch_rows: int = 64, seq_len: int = 32, reps: int = 5) -> Profile:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    vocab = int(model.config.vocab_size)
    ids = torch.randint(5, max(6, vocab - 1), (batch_rows, seq_len), device=device)
    mask = torch.ones_like(ids)
    h = model.embed(ids)
    state = model.layer_state(h, mask)
    embed_ms = _time_ms(lambda: model.embed(ids), reps, device)
    layer_ms = [_time_ms(lambda i=i: model.layer(i, h, state), reps, device) for i in range(model.num_layers)]
    ramp_ms = [_time_ms(lambda r=r: model.head_kind.decide_ramp(model.ramp(r, h, mask)), reps, device)
               for r in range(len(model.ramps))]
    head_ms = _time_ms(lambda: model.head(h, mask), reps, device)
    return Profile(
        device=str(device), dtype=str(dtype).removeprefix("torch."), batch_rows=batch_rows, seq_len=seq_len,
        embed_ms=embed_ms, layer_ms=layer_ms, ramp_ms=ramp_ms, head_ms=head_ms,
    )
