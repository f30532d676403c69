"""Tiny random classifiers of every supported family, built in the tests (no downloads)."""
from __future__ import annotations

import torch

VOCAB = 30522  # the packaged MiniLM tokenizer's vocabulary, so saved tiny models can use it

# Variants of one family that exercise a different code path carry a suffix: deberta_v2_conv (the ConvLayer after the
# first layer), modernbert_mean (mean pooling head).
FAMILIES = ["bert", "distilbert", "roberta", "deberta_v2", "deberta_v2_conv", "modernbert", "modernbert_mean",
            "electra", "albert", "mpnet", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text"]
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")


def _config(family: str, num_layers: int, num_labels: int):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_labels=num_labels, max_position_embeddings=128)
    encoder = dict(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2, intermediate_size=64, **common)
    if family not in ("bert", "distilbert", "roberta"):  # (their weights stay as the older tests know them)
        # Weights 10x the usual init: logits of order 1 and sharp attention, so that a mistake (a pad position
        # leaking into real ones, a wrong position) moves the logits well past the equivalence tolerance.
        encoder["initializer_range"] = 0.2
    # Decoders: grouped-query attention (1 KV head), pad id 0 (the MiniLM tokenizer's: the model finds each row's last
    # token with it), small sliding windows so that rows of up to ~15 tokens cross them.
    decoder = dict(encoder, num_key_value_heads=1, head_dim=16, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "bert":
        return tf.BertConfig(**encoder)
    if family == "distilbert":
        return tf.DistilBertConfig(dim=32, n_layers=num_layers, n_heads=2, hidden_dim=64, **common)
    if family == "roberta":
        return tf.RobertaConfig(pad_token_id=0, **encoder)
    if family in ("deberta_v2", "deberta_v2_conv"):
        # v3-like: relative attention with log buckets smaller than the rows, shared keys, no absolute positions;
        # the _conv variant adds v2's ConvLayer after the first layer.
        return tf.DebertaV2Config(relative_attention=True, position_buckets=8, max_relative_positions=32,
                                  pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                  position_biased_input=False, type_vocab_size=0, pooler_hidden_size=32,
                                  conv_kernel_size=3 if family.endswith("conv") else 0, **encoder)
    if family in ("modernbert", "modernbert_mean"):
        # global attention every 2nd layer, a local window of 6 tokens (3 each side) between
        return tf.ModernBertConfig(global_attn_every_n_layers=2, local_attention=6, pad_token_id=0, cls_token_id=101,
                                   sep_token_id=102, bos_token_id=101, eos_token_id=102,
                                   classifier_pooling="mean" if family.endswith("mean") else "cls", **encoder)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=16, **encoder)  # != hidden: embeddings_project
    if family == "albert":
        return tf.AlbertConfig(embedding_size=16, num_hidden_groups=1, inner_group_num=1, **encoder)
    if family == "mpnet":
        return tf.MPNetConfig(**encoder)
    if family == "llama":
        return tf.LlamaConfig(**decoder)
    if family == "qwen2":  # sliding window on the layers from max_window_layers up
        return tf.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **decoder)
    if family == "qwen3":
        return tf.Qwen3Config(**decoder)
    if family == "mistral":  # every layer sliding
        return tf.MistralConfig(sliding_window=4, **decoder)
    if family == "gemma":
        return tf.GemmaConfig(**decoder)
    if family == "gemma2":  # sliding and global layers alternate; attention logit soft-capping
        return tf.Gemma2Config(sliding_window=4, **decoder)
    if family == "gemma3_text":  # local layers with their own rotary base, a global one every 2nd layer
        return tf.Gemma3TextConfig(sliding_window=4, sliding_window_pattern=2, **decoder)
    raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES}")


def tiny_classifier(family: str = "bert", num_layers: int = 4, num_labels: int = 2, seed: int = 0,
                    problem_type: str | None = None):
    from transformers import AutoModelForSequenceClassification

    cfg = _config(family, num_layers, num_labels)
    if problem_type is not None:
        cfg.problem_type = problem_type
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    if family not in ("bert", "distilbert", "roberta"):  # (their weights stay as the older tests know them)
        # Biases and norm offsets are initialised to 0, which makes a padded position's hidden state exactly 0 in
        # some families (pad id 0 embeds to 0, LayerNorm(0) = its bias): a pad position leaking into real ones would
        # go unseen. Random ones make such a leak change the logits.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or ("norm" in name.lower() and name.endswith("weight")):
                    p.add_(torch.randn_like(p) * 0.1)
    return model


def save_tiny(path, family: str = "bert", num_layers: int = 4, num_labels: int = 2, seed: int = 0) -> str:
    """A tiny classifier saved like a user's model: safetensors + the packaged MiniLM tokenizer."""
    from pipeline.model.artifact import load_tokenizer

    model = tiny_classifier(family, num_layers, num_labels, seed)
    model.config.id2label = {i: f"class{i}" for i in range(num_labels)}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer("minilm-l6").save_pretrained(path)
    return str(path)
