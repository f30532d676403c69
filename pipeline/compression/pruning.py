"""Structured pruning of a sequence classifier: attention heads and feed-forward neurons removed as real, smaller
tensors under a config that says so, so plain `AutoModelForSequenceClassification.from_pretrained` loads the result
anywhere (no masks, no custom code, no `prune_heads`: transformers 5 removed it and `config.pruned_heads`).

What a transformers 5 config can express (checked against 5.25), per family:
- feed-forward neurons: every family, as one width for every layer (`intermediate_size`; DistilBERT `hidden_dim`).
  ModernBERT's `Wi` stacks [input; gate] halves, so neuron j is rows j and I+j; decoders' gate and up projections
  are pruned together.
- attention heads: the decoder families only (Llama, Qwen2/3, Mistral, Gemma/2/3), whose configs carry `head_dim`
  apart from `num_attention_heads`. Query heads go uniformly from every key/value group (grouped-query attention
  keeps its key/value heads); without grouping (`num_key_value_heads == num_attention_heads`) whole heads go.
  Encoder configs derive the head size as hidden_size / num_attention_heads (DeBERTa-v2 takes an
  `attention_head_size`, but its attention output projection is built hidden_size -> hidden_size), so fewer heads
  at the same hidden size cannot be written down: `refusal` says so and points at `ffn`.
- one width per kind for every layer (the configs hold one number): a share is removed from each layer, the
  least important units of that layer.

Importance is the diagonal Fisher information of a mask on each unit (Kwon et al. 2022, "A Fast Post-Training
Pruning Framework for Transformers"), taken under the model's own output distribution, so no labels are needed:
for a row x and unit u with mask m_u = 1, F_u = E_{y ~ p(y|x)} (d log p(y|x) / d m_u)^2, summed over rows. A unit
that never changes the output (a dead neuron, a head whose output projection is zero) scores exactly 0.

The surgery is torch-pruning's (`torch_pruning`, dependency-graph pruning): for the encoder families its
`DependencyGraph`, traced on the model, yields each feed-forward group (the neurons' producer and consumer layers),
which must match the family's layers below before `group.prune()` runs; where its tracer does not fit (decoders:
grouped-query attention's repeat_kv, where grouping never finishes; ModernBERT's chunked `Wi`) its layer pruning
functions slice the family's layers directly. The model is then rebuilt from the new config and loads the pruned
state strictly, so a config that does not describe the tensors fails here, not on a user's machine.
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.compression.importance import Importance, InputStats, unit_importance
from pipeline.compression.prunable import (
    FAMILIES,
    AttentionBlock,
    FFNBlock,
    PruningRefused,
    _heads_removed,
    _spec,
    attention_blocks,
    ffn_blocks,
    refusal,
)

__all__ = ["PruningRefused", "FFNBlock", "AttentionBlock", "Importance", "PrunePlan", "ffn_blocks",
           "attention_blocks", "refusal", "unit_importance", "plan", "prune", "widths", "FAMILIES", "CRITERIA"]


def _reconstructed(weight: torch.Tensor, bias: torch.Tensor | None, keep: list[int], stats: InputStats,
                   ridge: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The consumer layer's weight [H,k] (and bias) that best reproduces its output from the kept inputs alone, in
    least squares over the recorded tokens: y = W a + b ~ W' a_K + b'. With a bias: W' = W C[:,K] C[K,K]^-1 and
    b' = b + W mu - W' mu_K (C the inputs' covariance, mu their mean); without one, the same with second moments
    about zero. `ridge` (relative to the mean diagonal) keeps C[K,K] invertible."""
    n = max(stats.count, 1)
    mu = stats.total / n
    second = stats.outer / n
    c = second - torch.outer(mu, mu) if bias is not None else second
    k = torch.as_tensor(keep)
    ckk = c[k][:, k]
    ckk = ckk + ridge * ckk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(keep), dtype=c.dtype)
    w = weight.detach().to(c.dtype).cpu()  # [H,W]
    new_w = torch.linalg.solve(ckk, (w @ c[:, k]).T).T  # [H,k]: W C[:,K] C[K,K]^-1 (C[K,K] symmetric)
    new_b = None
    if bias is not None:
        new_b = bias.detach().to(c.dtype).cpu() + w @ mu - new_w @ mu[k]
    return new_w, new_b


# -- plan and surgery --------------------------------------------------------------------------------------------

@dataclass
class PrunePlan:
    """The units each block keeps (sorted indices): `ffn[b]` neurons, `heads[b]` query heads (None: keep all)."""

    ffn: list[list[int]] | None = None
    heads: list[list[int]] | None = None


def _keep_count(width: int, share: float, multiple: int) -> int:
    keep = width - int(round(share * width))
    if multiple > 1 and width >= 4 * multiple:
        keep = int(math.ceil(keep / multiple) * multiple)  # widths the matmul kernels like
    return max(1, min(width, keep))


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    # stable: ties keep the lower index, so a uniform score (nothing known) keeps the first units
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


CRITERIA = ("fisher", "output")


def _scores(importance: Importance, consumers: list[nn.Linear], kind: str, criterion: str,
            head_dim: int = 1) -> list[torch.Tensor]:
    """Per block, one score per unit. `fisher`: the Fisher importance (what removing the unit alone does to the
    model's output distribution). `output`: the unit's mean squared contribution to its block's output,
    E[a_u^2] * ||W[:, u]||^2 (what the least-squares refit has to make up for)."""
    if criterion == "fisher":
        return importance.ffn if kind == "ffn" else importance.heads
    stats = importance.ffn_inputs if kind == "ffn" else importance.head_inputs
    if stats is None:
        raise ValueError("criterion 'output' needs the importance's input statistics (input_stats=True)")
    out = []
    for lin, st in zip(consumers, stats):
        per_channel = (st.outer.diagonal() / max(st.count, 1)).float() * (lin.weight.detach().float() ** 2).sum(0).cpu()
        out.append(per_channel.view(-1, head_dim).sum(1))
    return out


def plan(model: nn.Module, importance: Importance, ffn: float | None = None, heads: float | None = None,
         multiple: int = 8, criterion: str = "fisher") -> PrunePlan:
    """Keep the most important (1 - share) of each block's neurons (rounded up to a multiple of `multiple` for
    blocks at least 4x as wide) and heads (the same number from every key/value group), most important by
    `criterion` (CRITERIA)."""
    if criterion not in CRITERIA:
        raise ValueError(f"importance criterion {criterion!r} is not one of {', '.join(CRITERIA)}")
    out = PrunePlan()
    if ffn:
        if not 0 < ffn < 1:
            raise ValueError(f"ffn share {ffn} must be in (0, 1): the share of each layer's neurons to remove")
        blocks = ffn_blocks(model)
        scores = _scores(importance, [b.output for b in blocks], "ffn", criterion)
        out.ffn = [_top(scores[i], _keep_count(b.width, ffn, multiple)) for i, b in enumerate(blocks)]
    if heads:
        if not 0 < heads < 1:
            raise ValueError(f"heads share {heads} must be in (0, 1): the share of each layer's heads to remove")
        if importance.heads is None:
            raise ValueError("the importance has no head scores: compute it with heads=True")
        out.heads = []
        att = attention_blocks(model)
        scores = _scores(importance, [a.o for a in att], "heads", criterion, att[0].head_dim)
        for i, a in enumerate(att):
            r, s = _heads_removed(a, heads), scores[i]
            if a.num_kv_heads < a.num_heads:
                group = a.num_heads // a.num_kv_heads
                keep = []
                for g in range(a.num_kv_heads):
                    keep += [g * group + j for j in _top(s[g * group:(g + 1) * group], group - r)]
                out.heads.append(sorted(keep))
            else:
                out.heads.append(_top(s, a.num_heads - r))
    return out


def widths(model: nn.Module) -> dict:
    """The model's prunable widths as its config states them."""
    family, spec = _spec(model)
    cfg = model.config
    out = {"family": family, "ffn_field": spec.ffn_field, "ffn": int(getattr(cfg, spec.ffn_field))}
    if spec.attention is not None:
        out["heads"] = int(cfg.num_attention_heads)
        out["kv_heads"] = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    return out


def _removed(width: int, keep: list[int]) -> list[int]:
    kept = set(keep)
    return [i for i in range(width) if i not in kept]


def _prune_ffn_traced(model: nn.Module, blocks: list[FFNBlock], keep: list[list[int]]) -> None:
    """torch-pruning's dependency graph: trace once, then each block's group (its neurons' producer and consumer),
    checked against the family's layers, pruned by the library."""
    import torch_pruning as tp

    ids = torch.full((1, 8), 5, dtype=torch.long, device=next(model.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "will prune the last non-singleton dimension" of embeddings' params
        dg = tp.DependencyGraph().build_dependency(
            model, example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            output_transform=lambda out: out.logits)
        for b, k in zip(blocks, keep):
            idxs = _removed(b.width, k)
            if not idxs:
                continue
            group = dg.get_pruning_group(b.inputs[0], tp.prune_linear_out_channels, idxs=idxs)
            touched = {(id(dep.target.module), dep.handler.__name__) for dep, _ in group
                       if isinstance(dep.target.module, nn.Linear)}
            expected = {(id(x), "prune_out_channels") for x in b.inputs} | {(id(b.output), "prune_in_channels")}
            if touched != expected:
                raise PruningRefused(f"{b.name}: torch-pruning's dependency graph couples the feed-forward neurons with "
                                     f"{len(touched)} layer slices, the family rules with {len(expected)}; not pruned")
            group.prune()


def _prune_ffn_direct(blocks: list[FFNBlock], keep: list[list[int]]) -> None:
    import torch_pruning as tp

    for b, k in zip(blocks, keep):
        idxs = _removed(b.width, k)
        if not idxs:
            continue
        width = b.width
        rows = [i + h * width for h in range(b.halves) for i in idxs]  # ModernBERT: both halves of Wi
        for lin in b.inputs:
            tp.prune_linear_out_channels(lin, rows)
        tp.prune_linear_in_channels(b.output, idxs)


def _prune_heads(blocks: list[AttentionBlock], keep: list[list[int]]) -> None:
    import torch_pruning as tp

    for a, k in zip(blocks, keep):
        gone = _removed(a.num_heads, k)
        if not gone:
            continue
        chans = [h * a.head_dim + j for h in gone for j in range(a.head_dim)]
        tp.prune_linear_out_channels(a.q, chans)
        tp.prune_linear_in_channels(a.o, chans)
        if a.num_kv_heads == a.num_heads:  # no grouping: each head has its own key and value
            tp.prune_linear_out_channels(a.k, chans)
            tp.prune_linear_out_channels(a.v, chans)


def _refit(lin: nn.Linear, original: nn.Linear, keep: list[int], stats: InputStats, ridge: float) -> None:
    new_w, new_b = _reconstructed(original.weight, original.bias, keep, stats, ridge)
    with torch.no_grad():
        lin.weight.copy_(new_w.to(lin.weight.dtype))
        if new_b is not None:
            lin.bias.copy_(new_b.to(lin.bias.dtype))


def _one_width(keep: list[list[int]], blocks: list, field: str, units: str) -> int:
    """The one count a config states for every layer, or why this plan cannot be written into it."""
    counts = {len(k) for k in keep}
    if len(keep) != len(blocks) or len(counts) != 1:
        raise PruningRefused(f"{field} is one number for every layer; the plan keeps {sorted(counts)} {units} in "
                             f"{len(keep)} blocks (of {len(blocks)})")
    return counts.pop()


def prune(model: nn.Module, p: PrunePlan, importance: Importance | None = None, reconstruct: bool = True,
          ridge: float = 1e-2) -> nn.Module:
    """A new classifier: `model`'s weights without the units `p` drops, under a config that states the new widths,
    rebuilt from that config (the pruned state loads strictly). `model` itself is left as it was.

    `reconstruct` (needs `importance` with input statistics): each pruned block's consumer layer (the feed-forward
    output projection, the attention output projection) is refit in least squares so the kept units reproduce the
    block's output on the recorded tokens (the dropped units' mean and what the kept ones can say of the rest);
    blocks that lose nothing keep their weights exactly."""
    family, spec = _spec(model)
    refit = reconstruct and importance is not None
    work = copy.deepcopy(model)
    cfg = copy.deepcopy(model.config)
    if p.ffn is not None:
        blocks = ffn_blocks(work)
        width = _one_width(p.ffn, blocks, f"{family}: config.{spec.ffn_field}", "neurons")
        before = [b.width for b in blocks]
        if spec.traced:
            _prune_ffn_traced(work, blocks, p.ffn)
        else:
            _prune_ffn_direct(blocks, p.ffn)
        if refit and importance.ffn_inputs is not None:
            for i, (b, orig, k) in enumerate(zip(blocks, ffn_blocks(model), p.ffn)):
                if len(k) < before[i]:
                    _refit(b.output, orig.output, k, importance.ffn_inputs[i], ridge)
        setattr(cfg, spec.ffn_field, width)
    if p.heads is not None:
        blocks = attention_blocks(work)
        a, kept = blocks[0], _one_width(p.heads, blocks, f"{family}: config.num_attention_heads", "heads")
        if a.num_kv_heads < a.num_heads and kept % a.num_kv_heads:
            raise PruningRefused(f"{kept} query heads do not split evenly over {a.num_kv_heads} key/value heads")
        _prune_heads(blocks, p.heads)
        if refit and importance.head_inputs is not None:
            for i, (b, orig, k) in enumerate(zip(blocks, attention_blocks(model), p.heads)):
                if len(k) < a.num_heads:
                    chans = [h * a.head_dim + j for h in k for j in range(a.head_dim)]
                    _refit(b.o, orig.o, chans, importance.head_inputs[i], ridge)
        cfg.head_dim = a.head_dim  # stated, no longer derivable from hidden_size / num_attention_heads
        cfg.num_attention_heads = kept
        if a.num_kv_heads == a.num_heads:
            cfg.num_key_value_heads = kept
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    new = type(model)(cfg)
    new.load_state_dict(work.state_dict(), strict=True)  # every tensor as the new config builds it
    return new.to(device=device, dtype=dtype).eval()
