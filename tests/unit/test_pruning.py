"""Structured pruning (pipeline.compression.pruning) on tiny random classifiers: loadable with plain from_pretrained,
the right slices gone, nothing changed when nothing is pruned, importance under the model's own outputs, refusals."""
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from pipeline.compression import pruning as P
from tests.tiny import DECODERS, FAMILIES, tiny_classifier


def _rows(seed=1, n=6, s=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # right padding, as the engine batches rows
    mask[1, 9:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _importance(model, heads=False):
    ids, mask = _rows()
    return P.unit_importance(model, [(ids, mask)], "softmax", heads=heads)


def _save_load(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def test_bert_ffn_pruning_loads_with_plain_from_pretrained(tmp_path):
    model = tiny_classifier("bert", num_layers=2)  # intermediate_size 64
    pruned = P.prune(model, P.plan(model, _importance(model), ffn=0.5), _importance(model))
    loaded = _save_load(pruned, tmp_path / "pruned")
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert loaded.config.intermediate_size == 32 and loaded.config.num_attention_heads == 2
    for layer in loaded.bert.encoder.layer:
        assert layer.intermediate.dense.weight.shape == (32, 32) and layer.output.dense.weight.shape == (32, 32)
    assert (tmp_path / "pruned" / "model.safetensors").exists()
    ids, mask = _rows()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(pruned, ids, mask))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kv_heads", [1, 2], ids=["grouped-query", "multi-head"])
def test_decoder_heads_and_ffn_pruning_loads_with_plain_from_pretrained(tmp_path, kv_heads):
    model = tiny_classifier("qwen2", num_layers=2)  # 2 query heads, head_dim 16, q/k/v with biases
    if kv_heads == 2:
        import transformers as tf

        cfg = model.config
        cfg.num_key_value_heads = 2
        torch.manual_seed(0)
        model = tf.Qwen2ForSequenceClassification(cfg).eval()
    imp = _importance(model, heads=True)
    pruned = P.prune(model, P.plan(model, imp, ffn=0.5, heads=0.5), imp)
    loaded = _save_load(pruned, tmp_path / "pruned")
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == (1, 16, 32)
    assert cfg.num_key_value_heads == 1
    attn = loaded.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (16, 32) and attn.o_proj.weight.shape == (32, 16)
    assert attn.k_proj.weight.shape == (16, 32)  # grouped-query: the one key/value head stays
    ids, mask = _rows()
    torch.testing.assert_close(_logits(loaded, ids, mask), _logits(pruned, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_pruned_leaves_the_logits_unchanged(family):
    model = tiny_classifier(family, num_layers=2)
    heads = family in DECODERS
    keep_all = P.PrunePlan(ffn=[list(range(b.width)) for b in P.ffn_blocks(model)],
                           heads=[list(range(a.num_heads)) for a in P.attention_blocks(model)] if heads else None)
    same = P.prune(model, keep_all, _importance(model, heads))
    ids, mask = _rows()
    assert torch.equal(_logits(same, ids, mask), _logits(model, ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_removes_exactly_the_planned_units(family):
    """Without the least-squares refit, the pruned model is the original with the dropped units silenced (their
    consumer columns zeroed): the surgery took the right slices of every layer, in every family."""
    model = tiny_classifier(family, num_layers=2)
    heads = family in DECODERS
    imp = _importance(model, heads)
    p = P.plan(model, imp, ffn=0.5, heads=0.5 if heads else None, multiple=1)
    pruned = P.prune(model, p, imp, reconstruct=False)
    silenced = P.prune(model, P.PrunePlan(ffn=[list(range(b.width)) for b in P.ffn_blocks(model)]))  # a copy
    with torch.no_grad():
        for b, keep in zip(P.ffn_blocks(silenced), p.ffn):
            gone = [i for i in range(b.width) if i not in keep]
            b.output.weight[:, gone] = 0
        if heads:
            for a, keep in zip(P.attention_blocks(silenced), p.heads):
                for h in range(a.num_heads):
                    if h not in keep:
                        a.o.weight[:, h * a.head_dim:(h + 1) * a.head_dim] = 0
    ids, mask = _rows()
    torch.testing.assert_close(_logits(pruned, ids, mask), _logits(silenced, ids, mask), rtol=1e-4, atol=1e-5)


def test_importance_ranks_a_dead_neuron_lowest():
    model = tiny_classifier("bert", num_layers=2)
    dead = 5
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[:, dead] = 0  # its activation reaches nothing
    imp = _importance(model)
    assert imp.ffn[1][dead] == 0 and int(imp.ffn[1].argmin()) == dead
    assert (imp.ffn[1] > 0).sum() == imp.ffn[1].numel() - 1  # labels never used: the model's own outputs suffice
    p = P.plan(model, imp, ffn=0.1, multiple=1)
    assert dead not in p.ffn[1] and len(p.ffn[1]) == 58


def test_importance_ranks_a_dead_head_lowest():
    model = tiny_classifier("llama", num_layers=2)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 16:32] = 0  # head 1 of layer 0 writes nothing
    imp = _importance(model, heads=True)
    assert imp.heads[0][1] == 0 and imp.heads[0][0] > 0
    assert P.plan(model, imp, heads=0.5).heads[0] == [0]


def test_least_squares_refit_brings_the_pruned_model_closer():
    model = tiny_classifier("electra", num_layers=2)
    imp = _importance(model)
    p = P.plan(model, imp, ffn=0.5, multiple=1)
    ids, mask = _rows()
    ref = _logits(model, ids, mask)
    err = {r: float((_logits(P.prune(model, p, imp, reconstruct=r), ids, mask) - ref).norm()) for r in (False, True)}
    assert err[True] < err[False]


@pytest.mark.parametrize("family,named", [("bert", "BertConfig derives the head size"),
                                          ("deberta_v2", "DebertaV2SelfOutput.dense"),
                                          ("distilbert", "dim / n_heads"), ("modernbert", "Wqkv")])
def test_heads_on_an_encoder_are_refused_naming_why_and_what_works(family, named):
    model = tiny_classifier(family, num_layers=2)
    reason = P.refusal(model, heads=0.5, ffn=None)
    assert named in reason and "--ffn" in reason and P.refusal(model, heads=None, ffn=0.5) is None
    with pytest.raises(P.PruningRefused, match="--heads cannot prune"):
        P.attention_blocks(model)


def test_a_head_share_under_one_head_per_group_is_refused():
    model = tiny_classifier("llama", num_layers=2)  # one key/value group of 2 query heads: shares in steps of 1/2
    assert "removes no head" in P.refusal(model, heads=0.2, ffn=None)


def test_a_plan_with_different_widths_per_layer_is_refused():
    model = tiny_classifier("bert", num_layers=2)
    with pytest.raises(P.PruningRefused, match="one number for every layer"):
        P.prune(model, P.PrunePlan(ffn=[list(range(32)), list(range(40))]))
