"""How much each prunable unit matters: the diagonal Fisher information of a mask on it under the model's own
output distribution (no labels), and the input statistics the least-squares refit of a consumer layer needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from pipeline.compression.prunable import attention_blocks, ffn_blocks


@dataclass
class Importance:
    """Fisher importance per unit: `ffn[b]` [width] per feed-forward block, `heads[b]` [num_heads] per attention
    block (None when heads were not scored), over `rows` rows."""

    ffn: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] | None = None
    rows: int = 0
    ffn_inputs: list["InputStats"] | None = None
    """Per feed-forward block, the statistics of what its consumer layer reads (for `prune(reconstruct=True)`)."""
    head_inputs: list["InputStats"] | None = None
    """Per attention block, the statistics of what its output projection reads."""

    def to_dict(self) -> dict:
        return {"rows": self.rows, "ffn": [t.tolist() for t in self.ffn],
                "heads": None if self.heads is None else [t.tolist() for t in self.heads]}


def _fisher(logits: torch.Tensor, masks: list[torch.Tensor], transform: str, max_exact: int = 8) -> list[torch.Tensor]:
    """Per unit, the Fisher information of the output distribution summed over rows: masks [B,U] (one per block,
    all ones, requiring grad) -> [U] each. softmax / sigmoid: the head's distribution over its labels (exact for
    up to `max_exact` labels, else one sampled label per row); none (regression): a unit-variance Gaussian."""
    B, C = logits.shape
    logits = logits.float()
    if C > max_exact:  # one label per row drawn from the model's own distribution: an unbiased estimate
        with torch.no_grad():
            if transform == "softmax":
                y = torch.multinomial(torch.softmax(logits, -1), 1).squeeze(1)
            elif transform == "sigmoid":
                y = torch.bernoulli(torch.sigmoid(logits))
        if transform == "softmax":
            ll = torch.log_softmax(logits, -1).gather(1, y[:, None]).sum()
        elif transform == "sigmoid":
            ll = -nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        else:
            ll = logits.sum()  # d/dm of -(y - f)^2 / 2 at y ~ N(f, 1) has the same second moment as df/dm
        grads = torch.autograd.grad(ll, masks)
        return [(g.float() ** 2).sum(0) for g in grads]
    per_label = [torch.autograd.grad(logits[:, c].sum(), masks, retain_graph=c < C - 1) for c in range(C)]
    with torch.no_grad():
        out = []
        for b in range(len(masks)):
            g = torch.stack([per_label[c][b].float() for c in range(C)], -1)  # [B,U,C]: d logit_c / d m_u per row
            if transform == "softmax":  # Var_{y~p} of d log p_y / dm = sum p g^2 - (sum p g)^2
                p = torch.softmax(logits, -1)[:, None, :]
                f = (p * g * g).sum(-1) - (p * g).sum(-1) ** 2
            elif transform == "sigmoid":
                s = torch.sigmoid(logits)[:, None, :]
                f = (s * (1 - s) * g * g).sum(-1)
            else:
                f = (g * g).sum(-1)
            out.append(f.clamp_min(0).sum(0))
        return out


def unit_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], transform: str = "softmax",
                    heads: bool = False, progress=None, total_rows: int | None = None,
                    input_stats: bool = True) -> Importance:
    """Fisher importance of every feed-forward neuron (and, with `heads`, attention head) of an HF classifier over
    `batches` of (input_ids [B,S], attention_mask [B,S]); `transform` is the head's (softmax, sigmoid, none).
    `input_stats`: also record what each consumer layer reads (`Importance.ffn_inputs` / `head_inputs`), the same
    pass, for `prune(..., reconstruct=True)`."""
    ffn = ffn_blocks(model)
    att = attention_blocks(model) if heads else []
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients flow to the masks only
    current: dict[str, torch.Tensor] = {}
    hooks = []
    stats: dict[str, InputStats] = {}

    def ffn_hook(key):
        def hook(mod, args):
            x = args[0]  # [B,S,W]: the neurons' activations, as the consumer layer reads them
            if key in stats:
                stats[key].add(x, current["mask"])
            return (x * current[key][:, None, :].to(x.dtype),) + tuple(args[1:])
        return hook

    def head_hook(key, head_dim):
        def hook(mod, args):
            x = args[0]  # [B,S,H*d]: the heads' outputs, concatenated
            if key in stats:
                stats[key].add(x, current["mask"])
            B, S, _ = x.shape
            m = current[key].to(x.dtype)[:, None, :, None]  # [B,1,H,1]
            return ((x.view(B, S, -1, head_dim) * m).reshape(B, S, -1),) + tuple(args[1:])
        return hook

    keys = []
    for i, b in enumerate(ffn):
        keys.append((f"ffn{i}", b.width))
        hooks.append(b.output.register_forward_pre_hook(ffn_hook(f"ffn{i}")))
    for i, a in enumerate(att):
        keys.append((f"head{i}", a.num_heads))
        hooks.append(a.o.register_forward_pre_hook(head_hook(f"head{i}", a.head_dim)))
    if input_stats:
        big = sum(b.width ** 2 for b in ffn) + sum(a.o.in_features ** 2 for a in att) > 2 ** 25  # > 256 MiB in float64
        dtype = torch.float32 if big else torch.float64
        stats.update({f"ffn{i}": InputStats.empty(b.width, dtype) for i, b in enumerate(ffn)})
        stats.update({f"head{i}": InputStats.empty(a.o.in_features, dtype) for i, a in enumerate(att)})
    sums = {k: torch.zeros(w, dtype=torch.float64) for k, w in keys}
    rows = 0
    device = next(model.parameters()).device
    try:
        for ids, mask in batches:
            ids, mask = ids.to(device), mask.to(device)
            B = ids.shape[0]
            current["mask"] = mask
            for k, w in keys:
                current[k] = torch.ones(B, w, device=device, requires_grad=True)
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
                fisher = _fisher(logits, [current[k] for k, _ in keys], transform)
            for (k, _), f in zip(keys, fisher):
                sums[k] += f.double().cpu()
            rows += B
            if progress:
                progress(rows, total_rows or rows)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return Importance(ffn=[sums[f"ffn{i}"].float() for i in range(len(ffn))],
                      heads=[sums[f"head{i}"].float() for i in range(len(att))] if heads else None, rows=rows,
                      ffn_inputs=[stats[f"ffn{i}"] for i in range(len(ffn))] if input_stats else None,
                      head_inputs=[stats[f"head{i}"] for i in range(len(att))] if input_stats and heads else None)


@dataclass
class InputStats:
    """First and second moments of a Linear layer's input over real (unpadded) tokens: count, sum [W], sum of outer
    products [W,W]."""

    count: int
    total: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, width: int, dtype=torch.float64) -> "InputStats":
        return cls(0, torch.zeros(width, dtype=dtype), torch.zeros(width, width, dtype=dtype))

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        """x [B,S,W], mask [B,S] (1 = real token)."""
        rows = x.detach().reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].to(self.outer.dtype).cpu()
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows
