"""Fine-tune an original classifier (AutoModelForSequenceClassification) so the demo has a real model.

Users normally bring their own; this exists so everything can be run offline end to end.
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
from pipeline.data.datasets import TextDataset, load_dataset
from pipeline.data.splits import train_and_held_out
from pipeline.data.texts import validate_text
from pipeline.model.artifact import resolve_base
from pipeline.model.classify import classifier_logits
from pipeline.training.loop import train_steps

log = logging.getLogger(__name__)


def _splits(cfg: FinetuneConfig) -> tuple[TextDataset, TextDataset]:
    ds = load_dataset(cfg.dataset, cfg.text_column, cfg.label_column, require_labels=True)
    bad = [i for i, t in enumerate(ds.texts) if validate_text(t)]
    if bad:
        raise ValueError(
            f"{cfg.dataset!r}: row {bad[0]} is unusable ({validate_text(ds.texts[bad[0]])}); "
            f"{len(bad)} such rows: clean the training data first"
        )
    train, test = train_and_held_out(ds, cfg.dataset, cfg.seed)
    return train.sample(cfg.limit, cfg.seed), test


def finetune(out: str, cfg: FinetuneConfig | None = None, progress=None) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = cfg or FinetuneConfig()
    torch.manual_seed(cfg.seed)
    train, test = _splits(cfg)
    names = train.label_names or [str(i) for i in range(int(train.labels.max()) + 1)]
    base = resolve_base(cfg.base)
    local = Path(base).exists()
    tok = AutoTokenizer.from_pretrained(base, local_files_only=local)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        local_files_only=local, use_safetensors=True,
    )
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    rng = np.random.default_rng(cfg.seed)
    labels = torch.as_tensor(train.labels)

    def loss_of(b):
        enc = tok([train.texts[i] for i in b], truncation=True, max_length=cfg.max_length, padding=True,
                  return_tensors="pt")
        return model(**enc, labels=labels[b]).loss

    t0 = time.perf_counter()
    step = train_steps(model, lambda: np.array_split(rng.permutation(len(train)), steps_per_epoch), loss_of,
                       total, cfg.learning_rate, progress)
    train_s = time.perf_counter() - t0
    pred = classifier_logits(model, tok, test.texts, cfg.max_length).argmax(-1).numpy()
    report = {
        "base": cfg.base,
        "dataset": cfg.dataset,
        "train_rows": len(train),
        "test_rows": len(test),
        "steps": step,
        "train_seconds": round(train_s, 1),
        "test_accuracy": float((pred == test.labels).mean()),
        "label_names": names,
    }
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    Path(out, "eval.json").write_text(json.dumps(report, indent=2))
    return report
