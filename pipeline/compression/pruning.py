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
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

__all__ = ["PruningRefused", "FFNBlock", "AttentionBlock", "Importance", "PrunePlan", "ffn_blocks",
           "attention_blocks", "refusal", "unit_importance", "plan", "prune", "widths", "FAMILIES"]


class PruningRefused(ValueError):
    """This family (or this kind of pruning) cannot be written into the model's config."""


@dataclass(frozen=True)
class _Spec:
    ffn_in: tuple[str, ...]
    """Paths (relative to one block) of the Linear layers whose output channels are the neurons."""
    ffn_out: str
    """Path of the Linear layer that reads the neurons (its input channels)."""
    ffn_field: str
    """The config field holding the neurons' count."""
    halves: int = 1
    """ModernBERT: `Wi` holds [input; gate], so neuron j is output channels j and width + j."""
    attention: tuple[str, str, str, str] | None = None
    """(q, k, v, o) paths for families whose config can express fewer heads."""
    heads_refusal: str = ""
    traced: bool = False
    """torch-pruning's DependencyGraph traces this family and groups its feed-forward layers correctly."""
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    """The blocks holding one FFN (and attention) each; default: the family's distinct layer modules."""


def _derived(config_name: str) -> str:
    return (f"{config_name} derives the head size as hidden_size / num_attention_heads, so fewer heads at the same "
            "hidden size cannot be written into its config (and transformers 5 removed prune_heads and "
            "config.pruned_heads)")


_BERT_LIKE = dict(ffn_in=("intermediate.dense",), ffn_out="output.dense", ffn_field="intermediate_size", traced=True)
_DECODER = dict(ffn_in=("mlp.gate_proj", "mlp.up_proj"), ffn_out="mlp.down_proj", ffn_field="intermediate_size",
                attention=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"))

FAMILIES: dict[str, _Spec] = {
    "bert": _Spec(**_BERT_LIKE, heads_refusal=_derived("BertConfig")),
    "roberta": _Spec(**_BERT_LIKE, heads_refusal=_derived("RobertaConfig (and XLMRobertaConfig)")),
    "electra": _Spec(**_BERT_LIKE, heads_refusal=_derived("ElectraConfig")),
    "mpnet": _Spec(**_BERT_LIKE, heads_refusal=_derived("MPNetConfig")),
    "deberta_v2": _Spec(**_BERT_LIKE, heads_refusal=(
        "DebertaV2Config takes an attention_head_size, but DeBERTa-v2's attention output projection "
        "(DebertaV2SelfOutput.dense) is built hidden_size -> hidden_size, so the narrower output of fewer heads "
        "cannot load")),
    "distilbert": _Spec(ffn_in=("ffn.lin1",), ffn_out="ffn.lin2", ffn_field="hidden_dim", traced=True,
                        heads_refusal="DistilBertConfig derives the head size as dim / n_heads, so fewer heads at "
                                      "the same dim cannot be written into its config"),
    "albert": _Spec(ffn_in=("ffn",), ffn_out="ffn_output", ffn_field="intermediate_size", traced=True,
                    heads_refusal=_derived("AlbertConfig"),
                    blocks=lambda model: [layer for group in model.albert.encoder.albert_layer_groups
                                          for layer in group.albert_layers]),
    "modernbert": _Spec(ffn_in=("mlp.Wi",), ffn_out="mlp.Wo", ffn_field="intermediate_size", halves=2,
                        heads_refusal=_derived("ModernBertConfig") + "; its query, key and value share one fused Wqkv"),
    **{name: _Spec(**_DECODER) for name in ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")},
}


def _spec(model: nn.Module) -> tuple[str, _Spec]:
    from pipeline.model.families import backbone

    family = backbone(model).family  # a clear refusal for an unsupported class
    if family not in FAMILIES:
        raise PruningRefused(f"family {family!r} has no pruning rules yet; pruning covers {', '.join(FAMILIES)}")
    return family, FAMILIES[family]


def _blocks(model: nn.Module, spec: _Spec) -> list[nn.Module]:
    from pipeline.model.families import backbone

    return spec.blocks(model) if spec.blocks else list(backbone(model).modules)


def _linear(block: nn.Module, path: str) -> nn.Linear:
    mod = block.get_submodule(path)
    if type(mod) is not nn.Linear:  # a quantized / wrapped layer: prune the float model, compress afterwards
        raise PruningRefused(f"{path} is a {type(mod).__name__}, not a plain Linear: prune the float model, then "
                             "quantize the pruned artifact")
    return mod


@dataclass
class FFNBlock:
    name: str
    inputs: list[nn.Linear]
    output: nn.Linear
    halves: int = 1

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass
class AttentionBlock:
    name: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """One entry per distinct feed-forward block (ALBERT: the shared layer once), in layer order."""
    _, spec = _spec(model)
    names = _names(model)
    return [FFNBlock(names.get(id(b), "?"), [_linear(b, p) for p in spec.ffn_in], _linear(b, spec.ffn_out),
                     spec.halves) for b in _blocks(model, spec)]


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """One entry per attention block whose heads the config can express; raises PruningRefused otherwise."""
    family, spec = _spec(model)
    if spec.attention is None:
        raise PruningRefused(f"--heads cannot prune {family}: {spec.heads_refusal}. What works instead: --ffn "
                             f"(feed-forward neurons, config.{spec.ffn_field})")
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    names = _names(model)
    return [AttentionBlock(names.get(id(b), "?"), *(_linear(b, p) for p in spec.attention), heads, kv, head_dim)
            for b in _blocks(model, spec)]


def refusal(model: nn.Module, heads: float | None, ffn: float | None) -> str | None:
    """Why pruning `heads` / `ffn` shares of this model cannot be expressed (None: it can)."""
    family, spec = _spec(model)
    if heads:
        try:
            blocks = attention_blocks(model)
        except PruningRefused as e:
            return str(e)
        a = blocks[0]
        if a.num_kv_heads < a.num_heads and _heads_removed(a, heads) == 0:
            group = a.num_heads // a.num_kv_heads
            return (f"--heads {heads} removes no head: {family} has {a.num_kv_heads} key/value groups of {group} "
                    f"query heads, and heads go from every group alike (shares in steps of 1/{group})")
    if ffn and not ffn_blocks(model):
        return f"{family} has no feed-forward blocks to prune"
    return None


# -- importance --------------------------------------------------------------------------------------------------

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


def _heads_removed(a: AttentionBlock, share: float) -> int:
    """Query heads removed from each key/value group (grouped-query attention), or in all (without grouping)."""
    if a.num_kv_heads < a.num_heads:
        group = a.num_heads // a.num_kv_heads
        return min(group - 1, int(round(share * group)))
    return min(a.num_heads - 1, int(round(share * a.num_heads)))


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    # stable: ties keep the lower index, so a uniform score (nothing known) keeps the first units
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:keep])


def plan(model: nn.Module, importance: Importance, ffn: float | None = None, heads: float | None = None,
         multiple: int = 8) -> PrunePlan:
    """Keep the most important (1 - share) of each block's neurons (rounded up to a multiple of `multiple` for
    blocks at least 4x as wide) and heads (the same number from every key/value group)."""
    out = PrunePlan()
    if ffn:
        if not 0 < ffn < 1:
            raise ValueError(f"ffn share {ffn} must be in (0, 1): the share of each layer's neurons to remove")
        blocks = ffn_blocks(model)
        out.ffn = [_top(importance.ffn[i], _keep_count(b.width, ffn, multiple)) for i, b in enumerate(blocks)]
    if heads:
        if not 0 < heads < 1:
            raise ValueError(f"heads share {heads} must be in (0, 1): the share of each layer's heads to remove")
        if importance.heads is None:
            raise ValueError("the importance has no head scores: compute it with heads=True")
        out.heads = []
        for i, a in enumerate(attention_blocks(model)):
            r, s = _heads_removed(a, heads), importance.heads[i]
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
        counts = {len(k) for k in p.ffn}
        if len(p.ffn) != len(blocks) or len(counts) != 1:
            raise PruningRefused(f"{family}: config.{spec.ffn_field} is one number for every layer; the plan keeps "
                                 f"{sorted(counts)} neurons in {len(p.ffn)} blocks (of {len(blocks)})")
        before = [b.width for b in blocks]
        if spec.traced:
            _prune_ffn_traced(work, blocks, p.ffn)
        else:
            _prune_ffn_direct(blocks, p.ffn)
        if refit and importance.ffn_inputs is not None:
            for i, (b, orig, k) in enumerate(zip(blocks, ffn_blocks(model), p.ffn)):
                if len(k) < before[i]:
                    _refit(b.output, orig.output, k, importance.ffn_inputs[i], ridge)
        setattr(cfg, spec.ffn_field, counts.pop())
    if p.heads is not None:
        blocks = attention_blocks(work)
        counts = {len(k) for k in p.heads}
        if len(p.heads) != len(blocks) or len(counts) != 1:
            raise PruningRefused(f"{family}: config.num_attention_heads is one number for every layer; the plan keeps "
                                 f"{sorted(counts)} heads in {len(p.heads)} blocks (of {len(blocks)})")
        a, kept = blocks[0], counts.pop()
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
