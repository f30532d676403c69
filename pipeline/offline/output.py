"""What a curation job keeps of its answers: every label's score as columns, and a filter on label or score
(as NeMo Curator's `prob_column` and `filter_by`)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def label_score_columns(head, logits: list) -> dict[str, pa.Array]:
    """`prob_<label>` per label (softmax probabilities, a multi-label head's sigmoids) from each row's head-space
    logits (None for an error row: nulls); a regression head's raw score is the `score` column already."""
    import torch

    names = head.score_columns()
    if head.kind == "regression":
        return {}
    rows = [i for i, x in enumerate(logits) if x is not None]
    scores = np.full((len(logits), len(names)), np.nan, np.float32)
    if rows:
        scores[rows] = head.label_scores(torch.as_tensor(np.stack([logits[i] for i in rows]))).numpy()
    valid = np.array([x is not None for x in logits])
    return {f"prob_{n}": pa.array(scores[:, c], pa.float32(), mask=~valid) for c, n in enumerate(names)}


def keep_mask(spec: dict, labels, scores, errors, multi_label: bool = False) -> np.ndarray:
    """[n] bool: the rows `spec` (OutputSpec.filter) keeps. Rows with an error are always kept (reported, never
    dropped); a multi-label answer ("a,b") is kept when any of its labels is in `labels`."""
    keep = np.ones(len(labels), bool)
    wanted = spec.get("labels")
    if wanted is not None:
        wanted = {str(w) for w in wanted}
        keep &= np.array([lab is not None and bool(wanted & (set(lab.split(",")) if multi_label else {lab}))
                          for lab in labels])
    if spec.get("min_score") is not None:
        keep &= np.array([s is not None and s >= spec["min_score"] for s in scores])
    if spec.get("max_score") is not None:
        keep &= np.array([s is not None and s <= spec["max_score"] for s in scores])
    return keep | np.array([e is not None for e in errors])
