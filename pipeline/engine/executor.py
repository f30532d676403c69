"""One micro-batch through the early-exit model: per-row exits inside a batch of any size.

Modes (DESIGN.md, Algorithms 3):
- exit: confident rows leave the batch, later layers run on fewer rows (and a shorter padded
  length); `shadow` rows always run to the end and are the feedback.
- release: a row is answered at its first confident ramp, and every row runs to the end as
  feedback (Apparate). With `defer_tail`, the hot path is exit mode's: rows answered at a ramp leave
  it and wait in a `Tail` (their hidden states) that `finish_tail` runs to the end afterwards, all
  together, stopping between layers when other work arrives (Serve runs it when the replica is idle).
  The hot path then reports only its shadow rows; every other row is reported with the tail, so a
  dropped tail drops whole rows of the batch at random, never a biased part of it.
A row's answer is the same in both modes and does not depend on its batch-mates, up to float rounding
(kernels differ by batch shape: a near-tie of two classes, or of a confidence and its threshold, may not hold).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.engine.policy import ExitPolicy
from pipeline.model.early_exit import EarlyExitModel
from pipeline.model.heads import Decision


@dataclass
class Tail:
    """Release mode with defer_tail: the batch's non-shadow rows, to report as feedback once the rows
    answered at a ramp have run to the end."""

    groups: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
    """(next layer index, batch positions [n], hidden [n,S,H], mask [n,S]) per ramp rows left at, in order."""
    label: torch.Tensor  # [B] long, the answers given (the feedback's agreement is measured against them)
    ramp_conf: torch.Tensor  # [B,R] every ramp's output so far (a row's ramps up to its exit are filled)
    ramp_pred: torch.Tensor  # [B,R]
    ended: torch.Tensor | None = None  # [m] rows no ramp answered: they already ran to the end
    ended_final: torch.Tensor | None = None  # [m] their final prediction

    @property
    def rows(self) -> int:
        return sum(len(g[1]) for g in self.groups) + (0 if self.ended is None else len(self.ended))


@dataclass
class TailFeedback:
    """A finished tail: rows [F] (batch positions) with every ramp's output and the final prediction."""

    rows: torch.Tensor
    ramp_conf: torch.Tensor  # [F,R]
    ramp_pred: torch.Tensor  # [F,R]
    final_pred: torch.Tensor  # [F]


@dataclass
class BatchOutput:
    label: torch.Tensor  # [B] long, the answer id (pipeline.model.heads: label, bin or label bitmask)
    score: torch.Tensor  # [B] float32, the answer's score (softmax probability of `label`, a regression's score)
    exit_layer: torch.Tensor  # [B] long, 1..L (L = answered by the original head)
    feedback_rows: torch.Tensor  # [F] long, rows (batch positions) that ran to the end, ascending
    ramp_conf: torch.Tensor  # [F,R] float32 every ramp's confidence (max softmax for a single-label head)
    ramp_pred: torch.Tensor  # [F,R] long, every ramp's answer id
    final_pred: torch.Tensor  # [F] long, the original head's answer id
    final_conf: torch.Tensor  # [F] float32
    layer_rows: list[int]  # rows that entered each layer (compute actually spent)
    tail: Tail | None = None
    """Release mode with defer_tail: the rest of the batch's feedback (`finish_tail`)."""
    logits: torch.Tensor | None = None
    """[B,C] float32 logits of the ramp or head that answered each row, in the original head's space (Serve and
    the output's label scores read them through the head's kind)."""
    reference: Decision | None = None
    """The float original's answers for the feedback rows ([F], in their order), when the predictor holds a
    reference model (pipeline.engine.predictor.Predictor)."""
    reference_window: object = None
    """...and its own ramp records of them (a FeedbackWindow)."""


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 ([n,S] or [n,S,H]) with zeros to `width`."""
    extra = width - x.shape[1]
    if extra <= 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, extra) if x.dim() == 3 else (0, extra))


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
    defer_tail: bool = False,
    multiple: int = 1,
) -> BatchOutput:
    """input_ids / attention_mask [B,S], right-padded; shadow [B] bool (exit mode's feedback rows, and the
    rows a deferred release tail reports in the hot path).

    on_exit(rows, labels, scores, layer, logits) is called as soon as rows exit at a ramp, before later
    layers run: the online path answers those requests early (Apparate's early release). logits [n,C].
    What an answer is (its id, confidence and score) is the head's kind's to say (model.head_kind).
    `multiple`: as rows leave, the batch keeps a row count and a width that are multiples of it (rows that exited
    ride along, their later outputs unused), so the layers see few distinct shapes: bfloat16 matmuls (oneDNN) and
    compiled layers pay for every new shape, ~2.5x a layer's work here.
    """
    if mode not in ("exit", "release"):
        raise ValueError(f"mode {mode!r} must be 'exit' or 'release'")
    if len(policy.thresholds) != len(model.ramps):
        raise ValueError(f"policy has {len(policy.thresholds)} thresholds for {len(model.ramps)} ramps")
    B, device = input_ids.shape[0], input_ids.device
    R, L = len(model.ramps), model.num_layers
    kind = model.head_kind
    release = mode == "release"
    feedback = torch.zeros(B, dtype=torch.bool, device=device) if shadow is None else shadow.to(device).bool()
    if release and not defer_tail:
        feedback = torch.ones(B, dtype=torch.bool, device=device)  # every row runs to the end in the batch

    label = torch.full((B,), -1, dtype=torch.long, device=device)
    score = torch.zeros(B, dtype=torch.float32, device=device)
    exit_layer = torch.full((B,), L, dtype=torch.long, device=device)
    logits = torch.zeros((B, model.num_labels), dtype=torch.float32, device=device)
    decided = torch.zeros(B, dtype=torch.bool, device=device)
    ramp_conf = torch.full((B, R), float("nan"), dtype=torch.float32, device=device)
    ramp_pred = torch.full((B, R), -1, dtype=torch.long, device=device)
    tail = Tail([], label, ramp_conf, ramp_pred) if release and defer_tail else None

    alive = torch.arange(B, device=device)  # batch positions still in the hot path
    mask = attention_mask
    h = model.embed(input_ids, token_type_ids)
    state = model.layer_state(h, mask)
    layer_rows: list[int] = []
    for i in range(L):
        layer_rows.append(len(alive))
        h = model.layer(i, h, state)
        r = model.ramp_at_layer.get(i + 1)
        if r is None or i + 1 == L:
            continue
        if not (release or policy.is_open(r) or feedback[alive].any()):
            continue  # a closed ramp costs nothing unless feedback needs its output
        d = kind.decide_ramp(model.ramp(r, h, mask))
        ramp_conf[alive, r], ramp_pred[alive, r] = d.conf, d.answer
        new = policy.exits(r, d.conf) & ~decided[alive]
        if new.any():
            rows = alive[new]
            label[rows], score[rows], exit_layer[rows] = d.answer[new], d.score[new], i + 1
            logits[rows] = d.logits[new]
            decided[rows] = True
            if on_exit is not None:
                on_exit(rows, d.answer[new], d.score[new], i + 1, logits[rows])
        if release and tail is None:
            continue  # plain release: every row runs to the end in the batch
        keep = ~decided[alive] | feedback[alive]
        if not keep.all():
            if tail is not None:  # answered rows wait in the tail, trimmed to their own longest row
                gone = ~keep
                width = int(mask[gone].sum(1).max())
                tail.groups.append((i + 1, alive[gone], h[gone, :width], mask[gone, :width]))
            if not keep.any():
                alive = alive[keep]
                break
            if multiple > 1 and tail is None:  # ride-along rows up to a multiple (see the docstring)
                extra = min(len(keep), -(-int(keep.sum()) // multiple) * multiple) - int(keep.sum())
                if extra > 0:
                    keep[torch.nonzero(~keep).flatten()[:extra]] = True
            # Rows are right-padded: drop columns no remaining row uses. One gather, contiguous, so a
            # compiled layer sees the same strides as on a fresh batch (else it recompiles).
            width = min(h.shape[1], -(-int(mask[keep].sum(1).max()) // multiple) * multiple)
            alive, h, mask = alive[keep], h[keep, :width], mask[keep, :width]
            state = model.layer_state(h, mask)

    final_pred = torch.empty(0, dtype=torch.long, device=device)
    final_conf = torch.empty(0, dtype=torch.float32, device=device)
    if len(alive):
        d = kind.decide(model.head(h, mask))
        final_conf, final_pred = d.conf, d.answer
        rest = ~decided[alive]
        rows = alive[rest]
        label[rows], score[rows] = final_pred[rest], d.score[rest]
        logits[rows] = d.logits[rest]
        fb = feedback[alive]
        if tail is not None:  # unanswered non-shadow rows are reported with the tail
            tail.ended, tail.ended_final = alive[~fb], final_pred[~fb]
        fb_rows = alive[fb]
        final_pred, final_conf = final_pred[fb], final_conf[fb]
    else:
        fb_rows = alive
    out = BatchOutput(label, score, exit_layer, fb_rows, ramp_conf[fb_rows], ramp_pred[fb_rows], final_pred,
                      final_conf, layer_rows, logits=logits)
    if tail is not None and tail.rows:
        out.tail = tail
    return out


@torch.inference_mode()
def finish_tail(model: EarlyExitModel, tail: Tail, stop: Callable[[], bool] | None = None) -> TailFeedback | None:
    """Run a release tail's rows to the end, all together, every ramp recorded: feedback only.

    Returns its rows' feedback (with the rows that had already ended), or None when `stop()` said other
    work waits before the last layer (checked between layers): then none of them is feedback."""
    L = model.num_layers
    done = [] if tail.ended is None else [(tail.ended, tail.ended_final)]
    rows = h = mask = None
    k = 0
    for i in range(tail.groups[0][0] if tail.groups else L, L):
        while k < len(tail.groups) and tail.groups[k][0] == i:  # rows that left at the ramp after layer i-1
            _, r2, h2, m2 = tail.groups[k]
            if rows is None:
                rows, h, mask = r2, h2, m2
            else:
                width = max(h.shape[1], h2.shape[1])
                rows = torch.cat([rows, r2])
                h = torch.cat([_pad_to(h, width), _pad_to(h2, width)])
                mask = torch.cat([_pad_to(mask, width), _pad_to(m2, width)])
            k += 1
            state = model.layer_state(h, mask)  # the rows changed
        if stop is not None and stop():
            return None
        h = model.layer(i, h, state)
        r = model.ramp_at_layer.get(i + 1)
        if r is not None and i + 1 != L:
            d = model.head_kind.decide_ramp(model.ramp(r, h, mask))
            tail.ramp_conf[rows, r], tail.ramp_pred[rows, r] = d.conf, d.answer
    if rows is not None:
        done.append((rows, model.head_kind.decide(model.head(h, mask)).answer))
    rows = torch.cat([d[0] for d in done])
    return TailFeedback(rows, tail.ramp_conf[rows], tail.ramp_pred[rows], torch.cat([d[1] for d in done]))
