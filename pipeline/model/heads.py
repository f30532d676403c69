"""What an answer is, for each kind of classification head.

The one place that says how logits become an answer: its id (what agreement compares), its confidence (what a
ramp's threshold is compared with), the output's score, every label's score, and how ramps learn from the
original head. Agreement of two answers is equality of their ids for every kind, so the tuner, the
controller, the certificate and verify compare integers and never ask which kind of head they have.

- single_label: softmax over C labels; the answer is the argmax; confidence = max softmax.
- regression (`num_labels == 1` or `problem_type: regression`, e.g. an educational-value score 0-5): the
  answer is the score's bin (default: rounded to an integer, clamped to the range seen at bootstrap). Ramps
  predict the bin (a softmax over bins, learned from soft bins around the head's score), so their
  confidence is a max softmax too; their score is the softmax's expected value, kept inside its bin.
- multi_label (`problem_type: multi_label_classification`): a sigmoid per label; the answer is the set of
  labels at or above `label_threshold`, as a bitmask; confidence = the least certain label's probability of
  being on the side it is on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

MAX_MULTI_LABELS = 62
"""A multi-label answer is a bitmask in an int64."""


@dataclass
class Decision:
    """A batch of answers from one head or ramp."""

    answer: torch.Tensor  # [B] int64: label id / bin / label bitmask; two answers agree when equal
    conf: torch.Tensor  # [B] float32: a ramp exits when conf >= its threshold
    score: torch.Tensor  # [B] float32: the output's `score` column
    logits: torch.Tensor  # [B,C] float32 in the original head's space (C = num_labels): every label's score


class HeadKind:
    """The kind of a classifier's head; see the module docstring."""

    kind: ClassVar[str]
    transform: ClassVar[str]
    """How `label_scores` comes from head-space logits, by the names an HTTP client uses (TEI's
    function_to_apply): softmax, sigmoid or none."""

    def __init__(self, label_names: list[str]):
        self.label_names = [str(n) for n in label_names]

    @property
    def num_labels(self) -> int:
        """Outputs of the original head."""
        return len(self.label_names)

    @property
    def ramp_outputs(self) -> int:
        """Outputs of a ramp."""
        return self.num_labels

    def decide(self, logits: torch.Tensor) -> Decision:
        """The original head's logits [B,C] -> its answers."""
        raise NotImplementedError

    def decide_ramp(self, logits: torch.Tensor) -> Decision:
        """A ramp's logits [B,ramp_outputs] -> its answers."""
        return self.decide(logits)

    def label(self, answer: int) -> str:
        """An answer id as the output's `label` string."""
        return self.label_names[answer]

    def label_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[B,C] every label's score (probability, or the raw score of a regression) from head-space logits."""
        raise NotImplementedError

    def score_columns(self) -> list[str]:
        """One name per column of `label_scores`."""
        return list(self.label_names)

    def ramp_targets(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """What ramps learn from: the original head's logits [N,C] -> targets [N,ramp_outputs]."""
        raise NotImplementedError

    def ramp_loss(self, ramp_logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """Distillation loss of ramp logits [B,ramp_outputs] against `ramp_targets` rows (mean over rows)."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind}


class SingleLabel(HeadKind):
    kind = "single_label"
    transform = "softmax"

    def decide(self, logits):
        logits = logits.float()
        p = torch.softmax(logits, dim=-1)
        conf, answer = p.max(dim=-1)
        return Decision(answer, conf, conf, logits)

    def label_scores(self, logits):
        return torch.softmax(logits.float(), dim=-1)

    def ramp_targets(self, logits, temperature):
        return torch.softmax(logits.float() / temperature, dim=-1)

    def ramp_loss(self, ramp_logits, targets, temperature):
        logp = torch.log_softmax(ramp_logits / temperature, dim=-1)
        return nn.functional.kl_div(logp, targets, reduction="batchmean") * temperature**2


class Regression(HeadKind):
    """`edges` [K-1] increasing bin boundaries (a score s is in bin k when edges[k-1] <= s < edges[k]);
    `values` [K]: each bin's name and its centre (the rounded integer by default)."""

    kind = "regression"
    transform = "none"

    def __init__(self, label_names: list[str], values: list[float], edges: list[float] | None = None):
        super().__init__(label_names)
        if len(self.label_names) != 1:
            raise ValueError(f"a regression head has one output, this one has {len(self.label_names)}")
        values = [float(v) for v in values]
        if len(values) < 2 or any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"regression bins {values} must be at least two increasing values")
        edges = [(a + b) / 2 for a, b in zip(values, values[1:])] if edges is None else [float(e) for e in edges]
        if len(edges) != len(values) - 1 or any(not (a < e < b) for a, e, b in zip(values, edges, values[1:])):
            raise ValueError(f"regression edges {edges} must separate the bin values {values}, one between each pair")
        self.values, self.edges = values, edges
        widths = [b - a for a, b in zip(values, values[1:])]
        self.width = sorted(widths)[len(widths) // 2]

    @classmethod
    def rounding(cls, label_names: list[str], low: float, high: float) -> "Regression":
        """Integer bins: a score rounds to the nearest integer, clamped to [round(low), round(high)]."""
        lo, hi = int(round(low)), int(round(high))
        if hi <= lo:
            hi = lo + 1
        return cls(label_names, list(range(lo, hi + 1)))

    @property
    def ramp_outputs(self) -> int:
        return len(self.values)

    def _bins(self, score: torch.Tensor) -> torch.Tensor:
        edges = torch.tensor(self.edges, dtype=score.dtype, device=score.device)
        return torch.bucketize(score, edges, right=True)  # edges[k-1] <= s < edges[k] -> k

    def decide(self, logits):
        score = logits.float()[:, 0]
        answer = self._bins(score)
        # confidence: 0.5 on a bin edge, 1.0 half a bin width or more away from the nearest one
        edges = torch.tensor(self.edges, dtype=score.dtype, device=score.device)
        margin = (score[:, None] - edges[None, :]).abs().min(dim=1).values
        conf = (0.5 + margin / self.width).clamp(max=1.0)
        return Decision(answer, conf, score, score[:, None])

    def decide_ramp(self, logits):
        p = torch.softmax(logits.float(), dim=-1)
        conf, answer = p.max(dim=-1)
        values = torch.tensor(self.values, dtype=p.dtype, device=p.device)
        # The expected value, kept inside the bin the ramp answered (so score and bin never contradict).
        lo = torch.tensor([-float("inf")] + self.edges, dtype=p.dtype, device=p.device)[answer]
        hi = torch.tensor(self.edges + [float("inf")], dtype=p.dtype, device=p.device)[answer]
        below = torch.nextafter(hi, torch.full_like(hi, -float("inf")))
        score = torch.minimum(torch.maximum(p @ values, lo), below)
        return Decision(answer, conf, score, score[:, None])

    def label(self, answer):
        v = self.values[answer]
        return str(int(v)) if float(v).is_integer() else f"{v:g}"

    def label_scores(self, logits):
        return logits.float()[:, :1]

    def score_columns(self):
        return ["score"]

    def ramp_targets(self, logits, temperature):
        # Soft bins around the head's score: a score near an edge splits its mass, so ramps learn the margin.
        score = logits.float()[:, :1]
        values = torch.tensor(self.values, dtype=score.dtype)
        sigma = self.width * temperature / 4
        return torch.softmax(-((score - values[None, :]) ** 2) / (2 * sigma**2), dim=-1)

    def ramp_loss(self, ramp_logits, targets, temperature):
        return nn.functional.kl_div(torch.log_softmax(ramp_logits, dim=-1), targets, reduction="batchmean")

    def to_dict(self):
        return {"kind": self.kind, "values": self.values, "edges": self.edges}


class MultiLabel(HeadKind):
    kind = "multi_label"
    transform = "sigmoid"

    def __init__(self, label_names: list[str], label_threshold: float = 0.5):
        super().__init__(label_names)
        if not 1 <= len(self.label_names) <= MAX_MULTI_LABELS:
            raise ValueError(f"a multi-label head here has 1..{MAX_MULTI_LABELS} labels (its answer is a bitmask), "
                             f"this one has {len(self.label_names)}")
        if not 0.0 < label_threshold < 1.0:
            raise ValueError(f"label_threshold={label_threshold} must be in (0, 1)")
        self.label_threshold = float(label_threshold)

    def decide(self, logits):
        logits = logits.float()
        p = torch.sigmoid(logits)
        on = p >= self.label_threshold
        bits = torch.bitwise_left_shift(torch.ones(1, dtype=torch.long, device=p.device),
                                        torch.arange(p.shape[1], device=p.device))
        answer = (on.long() * bits).sum(dim=1)
        conf = torch.where(on, p, 1 - p).min(dim=1).values
        return Decision(answer, conf, conf, logits)

    def label(self, answer):
        return ",".join(n for c, n in enumerate(self.label_names) if (int(answer) >> c) & 1)

    def label_scores(self, logits):
        return torch.sigmoid(logits.float())

    def ramp_targets(self, logits, temperature):
        return torch.sigmoid(logits.float() / temperature)

    def ramp_loss(self, ramp_logits, targets, temperature):
        bce = nn.functional.binary_cross_entropy_with_logits(ramp_logits / temperature, targets, reduction="none")
        return bce.sum(dim=1).mean() * temperature**2

    def to_dict(self):
        return {"kind": self.kind, "label_threshold": self.label_threshold}


KINDS = {k.kind: k for k in (SingleLabel, Regression, MultiLabel)}


def kind_of_config(config) -> str:
    """The head kind a transformers config declares (as transformers' own loss picks one)."""
    problem = getattr(config, "problem_type", None)
    if problem == "multi_label_classification":
        return MultiLabel.kind
    if problem == "regression" or (problem is None and int(config.num_labels) == 1):
        return Regression.kind
    return SingleLabel.kind


def label_names_of(config) -> list[str]:
    return [str(config.id2label.get(i, i)) for i in range(int(config.num_labels))]


def head_kind(config, recorded: dict[str, Any] | None = None) -> HeadKind:
    """The head of a classifier with this config: as `recorded` in an artifact's manifest (`Manifest.head`), or
    from the config alone (a regression then needs its bins: bootstrap records them)."""
    names = label_names_of(config)
    kind = (recorded or {}).get("kind") or kind_of_config(config)
    if kind != kind_of_config(config):
        raise ValueError(f"the manifest records a {kind} head, the model's config declares "
                         f"{kind_of_config(config)}: the artifact's model and manifest do not belong together")
    if kind == SingleLabel.kind:
        return SingleLabel(names)
    if kind == MultiLabel.kind:
        return MultiLabel(names, float((recorded or {}).get("label_threshold", 0.5)))
    if not recorded or "values" not in recorded:
        raise ValueError("a regression head needs its bins (values, edges); bootstrap records them in the manifest")
    return Regression(names, recorded["values"], recorded.get("edges"))


def head_from_scores(config, logits: torch.Tensor, bins: list[float] | None = None,
                     label_threshold: float = 0.5) -> HeadKind:
    """A classifier's head when no artifact records it yet (bootstrap, a plain model's compression check): a
    regression's bins are `bins` or, by default, the integers over the range of its scores in `logits` [N,1]."""
    kind = kind_of_config(config)
    names = label_names_of(config)
    if kind == Regression.kind:
        if bins is not None:
            return Regression(names, bins)
        return Regression.rounding(names, float(logits[:, 0].min()), float(logits[:, 0].max()))
    return MultiLabel(names, label_threshold) if kind == MultiLabel.kind else SingleLabel(names)
