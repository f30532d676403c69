"""Fine-tune an original classifier (AutoModelForSequenceClassification) so the demo has a real model.

Users normally bring their own; this exists so everything can be run offline end to end. Three heads, as
transformers names them (`problem_type`) and pipeline.model.heads runs them:
- single_label_classification: one class per row, softmax + cross-entropy; reports test accuracy.
- regression: one output (e.g. a 0-5 score), mean squared error; reports MAE, RMSE and how often the rounded
  prediction is the rounded target (the bins agreement compares).
- multi_label_classification: one output per label, sigmoid + binary cross-entropy; reports how often the predicted
  label set (sigmoid >= 0.5) is the gold set, and F1 per label.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import FinetuneConfig
from pipeline.data.datasets import MULTI_LABEL, REGRESSION, SINGLE_LABEL, TextDataset, load_dataset
from pipeline.data.splits import train_and_held_out
from pipeline.data.texts import validate_text
from pipeline.model.artifact import resolve_base
from pipeline.model.classify import classifier_logits
from pipeline.model.heads import MAX_MULTI_LABELS, MultiLabel, Regression
from pipeline.training.loop import train_steps

log = logging.getLogger(__name__)


def _splits(cfg: FinetuneConfig) -> tuple[TextDataset, TextDataset]:
    problem = None if cfg.problem_type == "auto" else cfg.problem_type
    ds = load_dataset(cfg.dataset, cfg.text_column, cfg.label_column, require_labels=True, problem_type=problem)
    if not ds.has_targets:
        raise ValueError(f"{cfg.dataset!r} has no {cfg.label_column!r} labels to fine-tune on")
    bad = [i for i, t in enumerate(ds.texts) if validate_text(t)]
    if bad:
        raise ValueError(
            f"{cfg.dataset!r}: row {bad[0]} is unusable ({validate_text(ds.texts[bad[0]])}); "
            f"{len(bad)} such rows: clean the training data first"
        )
    if ds.problem_type == MULTI_LABEL and len(ds.label_names) > MAX_MULTI_LABELS:
        raise ValueError(f"{cfg.dataset!r} has {len(ds.label_names)} labels; a multi-label head here has at most "
                         f"{MAX_MULTI_LABELS} (its answer is a bitmask)")
    train, test = train_and_held_out(ds, cfg.dataset, cfg.seed)
    return train.sample(cfg.limit, cfg.seed), test


def _label_names(train: TextDataset) -> list[str]:
    if train.problem_type == SINGLE_LABEL:
        return train.label_names or [str(i) for i in range(int(train.labels.max()) + 1)]
    return list(train.label_names)


def _training_labels(train: TextDataset) -> torch.Tensor:
    """What transformers' loss for the problem type takes: int64 classes [N], float scores [N], float 0/1 [N,L]."""
    if train.problem_type == SINGLE_LABEL:
        return torch.as_tensor(train.labels, dtype=torch.long)
    return torch.as_tensor(train.targets, dtype=torch.float32)


def _head_bias(train: TextDataset) -> torch.Tensor | None:
    """Where the new head's bias starts: the training scores' mean (regression) or each label's log-odds
    (multi-label), so the first steps do not go into learning an offset (a 0-5 score starts 2.5 away from a fresh
    head's ~0 output). None: single-label (transformers' init)."""
    if train.problem_type == REGRESSION:
        return torch.tensor([float(train.targets.mean())])
    if train.problem_type == MULTI_LABEL:
        rate = torch.as_tensor(train.targets.mean(0), dtype=torch.float32).clamp(0.01, 0.99)
        return torch.log(rate / (1 - rate))
    return None


@torch.no_grad()
def _set_head_bias(model, bias: torch.Tensor | None) -> None:
    """The classification head's output layer: the last Linear with `num_labels` outputs (BERT's `classifier`,
    RoBERTa's `classifier.out_proj`, a decoder's `score`, ...)."""
    if bias is None:
        return
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == len(bias)]
    if heads and heads[-1].bias is not None:
        heads[-1].bias.copy_(bias)
    else:
        log.warning("no head bias found to start at the targets' mean; training from transformers' init")


def evaluate(problem_type: str, logits: torch.Tensor, test: TextDataset, names: list[str]) -> dict:
    """Held-out metrics of a fine-tuned head's logits [N,C] against `test`'s targets."""
    if problem_type == SINGLE_LABEL:
        return {"test_accuracy": float((logits.argmax(-1).numpy() == test.labels).mean())}
    if problem_type == REGRESSION:
        pred, gold = logits[:, 0].numpy().astype(np.float64), test.targets.astype(np.float64)
        bins = Regression.rounding(names, float(gold.min()), float(gold.max()))  # integer bins over the gold range
        same = bins.decide(logits[:, :1]).answer == bins.decide(torch.as_tensor(gold, dtype=torch.float32)[:, None]).answer
        return {"test_mae": float(np.abs(pred - gold).mean()), "test_rmse": float(np.sqrt(((pred - gold) ** 2).mean())),
                "test_pearson": float(np.corrcoef(pred, gold)[0, 1]) if len(gold) > 1 else None,
                "test_bin_accuracy": float(same.float().mean()), "score_range": [float(gold.min()), float(gold.max())]}
    on = (torch.sigmoid(logits) >= 0.5).numpy()
    gold = test.targets >= 0.5
    head = MultiLabel(names)
    f1 = {}
    for c, name in enumerate(names):
        tp, fp, fn = (on[:, c] & gold[:, c]).sum(), (on[:, c] & ~gold[:, c]).sum(), (~on[:, c] & gold[:, c]).sum()
        f1[name] = float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 1.0
    gold_ids = head.decide(torch.where(torch.as_tensor(gold), 1.0, -1.0)).answer
    return {"test_exact_set_accuracy": float((head.decide(logits).answer == gold_ids).float().mean()),
            "test_f1_per_label": f1, "test_label_rate": dict(zip(names, gold.mean(0).round(4).tolist()))}


def finetune(out: str, cfg: FinetuneConfig | None = None, progress=None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = cfg or FinetuneConfig()
    torch.manual_seed(cfg.seed)
    train, test = _splits(cfg)
    problem = train.problem_type
    names = _label_names(train)
    base = resolve_base(cfg.base)
    local = Path(base).exists()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=local)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        problem_type=problem, local_files_only=local, use_safetensors=True,
    )
    _set_head_bias(model, _head_bias(train))
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    rng = np.random.default_rng(cfg.seed)
    labels = _training_labels(train)

    def loss_of(b):
        enc = tok([train.texts[i] for i in b], truncation=True, max_length=cfg.max_length, padding=True,
                  return_tensors="pt")
        return model(**enc, labels=labels[b]).loss

    t0 = time.perf_counter()
    step = train_steps(model, lambda: np.array_split(rng.permutation(len(train)), steps_per_epoch), loss_of,
                       total, cfg.learning_rate, progress)
    train_s = time.perf_counter() - t0
    logits = classifier_logits(model, tok, test.texts, cfg.max_length)
    report = {
        "base": cfg.base,
        "dataset": cfg.dataset,
        "problem_type": problem,
        "train_rows": len(train),
        "test_rows": len(test),
        "steps": step,
        "train_seconds": round(train_s, 1),
        **evaluate(problem, logits, test, names),
        "label_names": names,
    }
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    Path(out, "eval.json").write_text(json.dumps(report, indent=2))
    return report
