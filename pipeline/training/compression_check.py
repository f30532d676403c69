"""The check of a compression: the compressed model and its uncompressed source on the same held-out rows.
Agreement of the final predictions (a budget applies to 1 - agreement), gold accuracy when labels exist,
logit SQNR, and for an early-exit artifact also the early-exit answers at the manifest's thresholds."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.batching import padded_batches


class BudgetExceeded(RuntimeError):
    """A compressed or pruned model lost more agreement than its budget allows (nothing was written); `record` is
    what was measured."""

    def __init__(self, record: dict, what: str, against: str, fix: str):
        self.record = record
        c = record["check"]
        super().__init__(f"{what} loses {c['agreement_loss']:.2%} agreement with {against} on {c['rows']} rows of "
                         f"{c['data']}, over the budget of {c['budget']:.2%}; nothing was written. {fix}")


def heldout_texts(data: str, limit: int | None = None, text_column: str = "text", label_column: str = "label"):
    """(name, texts, labels or None): a built-in dataset's test split, or every row of a file / URL."""
    from pipeline.data.datasets import BUILTIN, load_dataset
    from pipeline.data.texts import validate_text

    ds = load_dataset(data, text_column, label_column)
    ds = ds.split("test") if data in BUILTIN else ds
    keep = [i for i, t in enumerate(ds.texts) if validate_text(t) is None]
    ds = ds.take(keep).head(limit)
    if not len(ds):
        raise ValueError(f"check data {data!r} has no usable rows; give --data with a text column")
    return ds.name, ds.texts, ds.labels


@torch.inference_mode()
def run_early_exit(model, tokenizer, texts: list[str], thresholds, active, max_length: int = 128):
    """(final logits [N,C], exit-rule labels [N], exit layers [N]): release mode, so every row also runs to the end."""
    from pipeline.engine.executor import execute
    from pipeline.engine.policy import ExitPolicy

    device = next(model.parameters()).device
    policy = ExitPolicy(np.asarray(thresholds), np.asarray(active))
    final = torch.empty(len(texts), model.num_labels)
    label = torch.empty(len(texts), dtype=torch.long)
    layer = torch.empty(len(texts), dtype=torch.long)
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    for idx, ids, mask in padded_batches(rows, tokenizer.pad_token_id or 0, 64):
        idx, ids, mask = torch.from_numpy(idx), torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        final[idx] = model.full_forward(ids, mask).float().cpu()
        res = execute(model, ids, mask, policy, "release")
        label[idx], layer[idx] = res.label.cpu(), res.exit_layer.cpu()
    return final, label, layer


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (cf. torchao's tests); inf when identical."""
    noise = (ref.float() - x.float()).norm()
    return float("inf") if noise == 0 else float(20 * torch.log10(ref.float().norm() / noise))


def check(source_logits: torch.Tensor, logits: torch.Tensor, gold, data: str, budget: float, head=None) -> dict:
    """Agreement of two models' answers (as `head`, a pipeline.model.heads.HeadKind, defines them; default: a
    single-label softmax head) on the same rows; gold accuracy when labels exist and the head is single-label."""
    from pipeline.model.heads import SingleLabel

    head = head or SingleLabel([str(i) for i in range(source_logits.shape[1])])
    src, pred = head.decide(source_logits).answer.numpy(), head.decide(logits).answer.numpy()
    if head.kind != SingleLabel.kind:
        gold = None  # gold labels here are class ids: accuracy means something for a single-label head only
    agreement = float((src == pred).mean())
    out = {
        "data": data,
        "rows": int(len(pred)),
        "agreement": agreement,
        "agreement_loss": 1.0 - agreement,
        "budget": budget,
        "within_budget": 1.0 - agreement <= budget + 1e-12,
        "logit_sqnr_db": sqnr_db(source_logits, logits),
        "accuracy": float((pred == gold).mean()) if gold is not None else None,
        "source_accuracy": float((src == gold).mean()) if gold is not None else None,
    }
    if gold is not None:
        out["accuracy_drop"] = out["source_accuracy"] - out["accuracy"]
    return out


def check_artifact(source, target, tokenizer, manifest, texts: list[str], gold, data: str,
                   budget: float, original=None) -> tuple[dict, np.ndarray]:
    """(`check` of two EarlyExitModels plus their early-exit answers, the source's final labels [N]). `original`
    [N]: the float original's answers when the source was derived from it (a pruned artifact); the target's
    agreement with them is added (`original_agreement`, `original_exit_agreement`)."""
    max_len = min(manifest.max_length, 512)
    s_final, s_label, s_layer = run_early_exit(source, tokenizer, texts, manifest.thresholds, manifest.active, max_len)
    c_final, c_label, c_layer = run_early_exit(target, tokenizer, texts, manifest.thresholds, manifest.active, max_len)
    result = check(s_final, c_final, gold, data, budget, source.head_kind)
    ref = source.head_kind.decide(s_final).answer
    result["exit_agreement"] = float((c_label == ref).float().mean())
    result["source_exit_agreement"] = float((s_label == ref).float().mean())
    result["mean_exit_layer"] = float(c_layer.float().mean())
    result["source_mean_exit_layer"] = float(s_layer.float().mean())
    if gold is not None:
        result["exit_accuracy"] = float((c_label.numpy() == gold).mean())
    if original is not None:
        original = torch.as_tensor(original)
        result["original_agreement"] = float((target.head_kind.decide(c_final).answer == original).float().mean())
        result["original_exit_agreement"] = float((c_label == original).float().mean())
    return result, ref.numpy()
