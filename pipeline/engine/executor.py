"""One micro-batch through the early-exit model: per-row exits inside a batch of any size.

Modes (DESIGN.md, Algorithms 3):
- release: every row runs every layer; a row's answer is the first ramp that is confident
  (its exit layer is recorded) and every row's final prediction is feedback. Once every row is
  answered the rest is feedback only: it may run on fewer threads, and is cut to the shadow rows
  when the caller says work is waiting (`stop_tail`).
- exit: confident rows leave the batch, later layers run on fewer rows (and a shorter
  padded length); `shadow` rows always run to the end and are the feedback.
A row's answer is the same in both modes and never depends on its batch-mates.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.engine.policy import ExitPolicy
from pipeline.model.early_exit import EarlyExitModel


@dataclass
class BatchOutput:
    label: torch.Tensor  # [B] long
    score: torch.Tensor  # [B] float32, softmax probability of `label`
    exit_layer: torch.Tensor  # [B] long, 1..L (L = answered by the original head)
    feedback_rows: torch.Tensor  # [F] long, rows (batch positions) that ran to the end
    ramp_conf: torch.Tensor  # [F,R] float32 max softmax of every ramp
    ramp_pred: torch.Tensor  # [F,R] long
    final_pred: torch.Tensor  # [F] long, the original head's prediction
    final_conf: torch.Tensor  # [F] float32
    layer_rows: list[int]  # rows that entered each layer (compute actually spent)


def _conf_pred(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.softmax(logits.float(), dim=-1).max(dim=-1)


def _restores_threads(fn):
    """Whatever `fn` does to torch's intra-op thread count is undone when it returns or raises."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    return wrapper


@_restores_threads
@torch.inference_mode()
def execute(
    model: EarlyExitModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    policy: ExitPolicy,
    mode: str = "exit",
    shadow: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    on_exit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None] | None = None,
    stop_tail: Callable[[], bool] | None = None,
    tail_threads: int | None = None,
) -> BatchOutput:
    """input_ids / attention_mask [B,S], right-padded; shadow [B] bool (exit mode's feedback rows).

    on_exit(rows, labels, scores, layer) is called as soon as rows exit at a ramp, before later
    layers run: the online path answers those requests early (Apparate's early release).

    Release mode, once every row is answered the rest is feedback only: with `tail_threads` it runs on
    that many torch threads (CPU), and when `stop_tail()` says work is waiting it goes on for the
    `shadow` rows only, as exit mode would have.
    """
    if mode not in ("exit", "release"):
        raise ValueError(f"mode {mode!r} must be 'exit' or 'release'")
    if len(policy.thresholds) != len(model.ramps):
        raise ValueError(f"policy has {len(policy.thresholds)} thresholds for {len(model.ramps)} ramps")
    B, device = input_ids.shape[0], input_ids.device
    R, L = len(model.ramps), model.num_layers
    feedback = torch.ones(B, dtype=torch.bool, device=device)
    if mode == "exit":
        feedback = torch.zeros(B, dtype=torch.bool, device=device) if shadow is None else shadow.to(device).bool()

    label = torch.full((B,), -1, dtype=torch.long, device=device)
    score = torch.zeros(B, dtype=torch.float32, device=device)
    exit_layer = torch.full((B,), L, dtype=torch.long, device=device)
    decided = torch.zeros(B, dtype=torch.bool, device=device)
    ramp_conf = torch.full((B, R), float("nan"), dtype=torch.float32, device=device)
    ramp_pred = torch.full((B, R), -1, dtype=torch.long, device=device)

    alive = torch.arange(B, device=device)  # batch positions still in the batch
    mask = attention_mask
    h = model.embed(input_ids, token_type_ids)
    lmask = model.layer_mask(h, mask)
    layer_rows: list[int] = []
    tail_threads = tail_threads if device.type == "cpu" else None
    watch_tail = mode == "release" and bool(tail_threads or (stop_tail and shadow is not None))
    for i in range(L):
        layer_rows.append(len(alive))
        h = model.layer(i, h, lmask)
        r = model.ramp_at_layer.get(i + 1)
        if r is None or i + 1 == L:
            continue
        if not (policy.is_open(r) or feedback[alive].any()):
            continue  # a closed ramp costs nothing unless feedback needs its output
        conf, pred = _conf_pred(model.ramp(r, h, mask))
        ramp_conf[alive, r], ramp_pred[alive, r] = conf, pred
        new = policy.exits(r, conf) & ~decided[alive]
        if new.any():
            rows = alive[new]
            label[rows], score[rows], exit_layer[rows] = pred[new], conf[new], i + 1
            decided[rows] = True
            if on_exit is not None:
                on_exit(rows, pred[new], conf[new], i + 1)
        cut = False
        if watch_tail and bool(decided.all()):  # every row answered: the rest only feeds the controller
            if tail_threads and torch.get_num_threads() > tail_threads:
                torch.set_num_threads(tail_threads)  # restored by @_restores_threads
            if stop_tail is not None and shadow is not None and stop_tail():
                feedback, cut, watch_tail = shadow.to(device).bool(), True, False  # work waits: shadow rows only
        if mode == "exit" or cut:
            keep = ~decided[alive] | feedback[alive]
            if not keep.all():
                alive, h, mask = alive[keep], h[keep], mask[keep]
                if len(alive) == 0:
                    break
                # Rows are right-padded: drop columns no remaining row uses. Contiguous, so a compiled
                # layer sees the same strides as on a fresh batch (else it recompiles).
                width = int(mask.sum(1).max())
                if width < h.shape[1]:
                    h, mask = h[:, :width].contiguous(), mask[:, :width].contiguous()
                lmask = model.layer_mask(h, mask)

    final_pred = torch.empty(0, dtype=torch.long, device=device)
    final_conf = torch.empty(0, dtype=torch.float32, device=device)
    if len(alive):
        final_conf, final_pred = _conf_pred(model.head(h))
        rest = ~decided[alive]
        rows = alive[rest]
        label[rows], score[rows] = final_pred[rest], final_conf[rest]
        fb = feedback[alive]
        fb_rows = alive[fb]
        final_pred, final_conf = final_pred[fb], final_conf[fb]
    else:
        fb_rows = alive
    return BatchOutput(
        label, score, exit_layer, fb_rows, ramp_conf[fb_rows], ramp_pred[fb_rows], final_pred, final_conf, layer_rows
    )
