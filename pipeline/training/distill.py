"""Layer-dropping knowledge distillation (the DistilBERT recipe) for encoder classifiers.

The student is the teacher with a subset of its encoder layers: same embeddings, the chosen layers
(copied, so the student starts from the teacher's weights), same pooler / classifier head. It is
trained on soft targets (KL at temperature T, scaled by T^2) plus hard-label cross-entropy when the
data has labels, then saved as a normal classifier directory (safetensors + tokenizer) with a JSON
report of its agreement with the teacher and gold accuracy on held-out data. `offramp bootstrap`
adds ramps to it like to any other classifier.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from pipeline.data.batching import pad_rows
from pipeline.model.classify import logits_of_rows
from pipeline.training.loop import train_steps

log = logging.getLogger(__name__)

REPORT = "distill.json"


class DistillConfig(BaseModel):
    """Distilling a student with fewer layers from a teacher classifier."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    keep_layers: list[int] | None = None
    """Teacher layers (0-based) the student keeps, e.g. [0, 2, 4]. Give this or `num_layers`."""
    num_layers: int | None = Field(None, ge=1)
    """Keep this many layers, spread evenly from the bottom (6 -> 3 keeps 0, 2, 4: DistilBERT's every other)."""
    data: str = "movie-reviews"
    """A built-in dataset name or a parquet/jsonl/csv path or fsspec URL. Labels are used when present."""
    text_column: str = "text"
    label_column: str = "label"
    temperature: float = Field(2.0, gt=0)
    """Softmax temperature of the soft targets."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the soft (KD) loss; 1 - alpha goes to hard-label cross-entropy (when labels exist)."""
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    max_length: int = Field(128, ge=8)
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (tests and smoke runs)."""
    limit: int | None = Field(None, ge=1)
    """Use only the first N training rows."""
    eval_limit: int | None = Field(None, ge=1)
    """Evaluate on only the first N held-out rows."""
    seed: int = 0

    @model_validator(mode="after")
    def _one_choice(self) -> "DistillConfig":
        if (self.keep_layers is None) == (self.num_layers is None):
            raise ValueError("give exactly one of keep_layers (e.g. [0, 2, 4]) or num_layers (e.g. 3)")
        return self


def choose_layers(teacher_layers: int, keep_layers: list[int] | None = None, num_layers: int | None = None) -> list[int]:
    """The teacher layers (0-based, increasing) the student keeps."""
    if keep_layers is not None:
        keep = [int(k) for k in keep_layers]
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= teacher_layers:
            raise ValueError(
                f"keep_layers {keep} must be distinct, increasing and within 0..{teacher_layers - 1} "
                f"(the teacher has {teacher_layers} layers)"
            )
        return keep
    if num_layers is None or not 1 <= num_layers <= teacher_layers:
        raise ValueError(f"num_layers={num_layers} must be between 1 and the teacher's {teacher_layers} layers")
    return [i * teacher_layers // num_layers for i in range(num_layers)]


def _layers_prefix(model: nn.Module) -> str:
    """State-dict prefix of the encoder's layer list, e.g. 'bert.encoder.layer'."""
    from pipeline.model.families import backbone

    layers = backbone(model).modules
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise ValueError(f"cannot locate the encoder layers of {type(model).__name__}")


def make_student(teacher: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of `teacher` with only the encoder layers `keep` (0-based), weights copied from the teacher."""
    from pipeline.model.families import backbone

    n = len(backbone(teacher).modules)
    keep = choose_layers(n, keep_layers=keep)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(keep)  # DistilBertConfig maps this to n_layers
    if getattr(cfg, "layer_types", None) is not None and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[k] for k in keep]
    student = type(teacher)(cfg)
    prefix = _layers_prefix(teacher) + "."
    state = {}
    for key, value in teacher.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) in keep:
                state[f"{prefix}{keep.index(int(idx))}.{rest}"] = value.detach().clone()
        else:
            state[key] = value.detach().clone()
    student.load_state_dict(state, strict=True)
    return student.to(next(teacher.parameters()).dtype).eval()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            temperature: float, alpha: float) -> torch.Tensor:
    """alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE(student, labels); logits [B,C], labels [B]."""
    T = temperature
    soft = nn.functional.kl_div(
        torch.log_softmax(student_logits / T, -1), torch.softmax(teacher_logits / T, -1), reduction="batchmean"
    ) * (T * T)
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * nn.functional.cross_entropy(student_logits, labels)


def _splits(cfg: DistillConfig):
    from pipeline.data.datasets import load_dataset
    from pipeline.data.splits import train_and_held_out
    from pipeline.data.texts import validate_text

    ds = load_dataset(cfg.data, cfg.text_column, cfg.label_column)
    bad = [i for i, t in enumerate(ds.texts) if validate_text(t)]
    if bad:
        log.warning("distill: skipping %d unusable rows (first: row %d)", len(bad), bad[0])
        drop = set(bad)
        ds = ds.take([i for i in range(len(ds)) if i not in drop])
    train, test = train_and_held_out(ds, cfg.data, cfg.seed)
    train, test = train.head(cfg.limit), test.head(cfg.eval_limit)
    if len(train) < 2 or len(test) < 1:
        raise ValueError(f"distill data {cfg.data!r} has too few usable rows ({len(train)} train, {len(test)} held out)")
    return train, test


def _bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar-length rows (far less padding than random batches)."""
    perm = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(perm), chunk):
        part = perm[s : s + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def distill(teacher_dir: str, out: str, cfg: DistillConfig, progress=None) -> dict:
    """Build, train and save a student; returns (and writes to out/distill.json) the report."""
    from pipeline.model.artifact import load_classifier, load_tokenizer

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    teacher = load_classifier(teacher_dir)
    tok = load_tokenizer(teacher_dir)
    from pipeline.model.families import backbone

    n_teacher = len(backbone(teacher).modules)
    keep = choose_layers(n_teacher, cfg.keep_layers, cfg.num_layers)
    student = make_student(teacher, keep)
    train, test = _splits(cfg)
    pad_id = tok.pad_token_id or 0
    enc = tok(train.texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    teacher_logits = logits_of_rows(teacher, enc, pad_id)  # the teacher runs once, not once per epoch
    labels = torch.as_tensor(train.labels) if train.labels is not None else None

    lengths = np.array([len(e) for e in enc])
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = cfg.max_steps or max(1, int(steps_per_epoch * cfg.epochs))
    rng = np.random.default_rng(cfg.seed)

    def loss_of(b):
        ids, mask = (torch.from_numpy(a) for a in pad_rows([enc[i] for i in b], pad_id))
        bt = torch.as_tensor(b)
        logits = student(input_ids=ids, attention_mask=mask).logits
        return kd_loss(logits, teacher_logits[bt], None if labels is None else labels[bt], cfg.temperature, cfg.alpha)

    step = train_steps(student, lambda: _bucketed_batches(lengths, cfg.batch_size, rng), loss_of, total,
                       cfg.learning_rate, progress)
    train_s = time.perf_counter() - t0

    test_enc = tok(test.texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    t_pred = logits_of_rows(teacher, test_enc, pad_id).argmax(-1).numpy()
    s_pred = logits_of_rows(student, test_enc, pad_id).argmax(-1).numpy()
    gold = test.labels
    report = {
        "teacher": str(teacher_dir),
        "teacher_layers": n_teacher,
        "keep_layers": keep,
        "student_layers": len(keep),
        "data": cfg.data,
        "train_rows": len(train),
        "heldout": test.name,
        "heldout_rows": len(test),
        "steps": step,
        "epochs": cfg.epochs,
        "temperature": cfg.temperature,
        "alpha": cfg.alpha if labels is not None else 1.0,
        "hard_labels": labels is not None,
        "train_seconds": round(train_s, 1),
        "agreement_with_teacher": float((s_pred == t_pred).mean()),
        "student_accuracy": float((s_pred == gold).mean()) if gold is not None else None,
        "teacher_accuracy": float((t_pred == gold).mean()) if gold is not None else None,
    }
    if gold is not None:
        report["accuracy_drop"] = report["teacher_accuracy"] - report["student_accuracy"]
    Path(out).mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    Path(out, REPORT).write_text(json.dumps(report, indent=2))
    return report
