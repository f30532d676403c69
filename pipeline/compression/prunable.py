"""Where a family's prunable units are (feed-forward blocks, attention blocks) and what its config can state
(pipeline.compression.pruning explains what is pruned and why)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


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


def _heads_removed(a: AttentionBlock, share: float) -> int:
    """Query heads removed from each key/value group (grouped-query attention), or in all (without grouping)."""
    if a.num_kv_heads < a.num_heads:
        group = a.num_heads // a.num_kv_heads
        return min(group - 1, int(round(share * group)))
    return min(a.num_heads - 1, int(round(share * a.num_heads)))
