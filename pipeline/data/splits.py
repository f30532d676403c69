"""Splitting a dataset for bootstrap and replay: the same rows for every command."""
from __future__ import annotations

import logging

import numpy as np

from pipeline.config import BootstrapConfig
from pipeline.data.datasets import BUILTIN, TextDataset, load_dataset
from pipeline.data.texts import validate_text

log = logging.getLogger(__name__)


def split_data(data: str, cfg: BootstrapConfig) -> tuple[TextDataset, TextDataset]:
    """(fit, validation) rows of `data` for bootstrapping ramps (and replaying them): unusable texts skipped
    with a warning; a built-in's shared deterministic split (its test rows stay unseen), else a seeded
    `validation_fraction`; `limit` samples both."""
    ds = load_dataset(data, text_column=cfg.text_column, label_column=None)
    bad = [i for i, t in enumerate(ds.texts) if validate_text(t)]
    if bad:
        log.warning("skipping %d unusable rows (first: row %d: %s)", len(bad), bad[0],
                    validate_text(ds.texts[bad[0]]))
        ds = ds.take([i for i in range(len(ds)) if i not in set(bad)])
    fit, val = train_and_held_out(ds, data, cfg.seed, "validation", cfg.validation_fraction)
    if cfg.limit:
        fit = fit.sample(cfg.limit, cfg.seed)
        val = val.sample(max(1, int(cfg.limit * cfg.validation_fraction / (1 - cfg.validation_fraction))), cfg.seed)
    if len(fit) < 2 or len(val) < 1:
        raise ValueError(f"bootstrap data {data!r} has too few usable rows ({len(fit)} train, {len(val)} validation)")
    return fit, val


def train_and_held_out(ds: TextDataset, data: str, seed: int, held_out: str = "test",
                       fraction: float = 0.1) -> tuple[TextDataset, TextDataset]:
    """(train, held-out) rows of `ds` (loaded from `data`): a built-in's shared deterministic split, so its test
    rows are never trained on by any command, else a seeded `fraction` of the rows (at least one)."""
    if data in BUILTIN:
        return ds.split("train", seed), ds.split(held_out, seed)
    order = np.random.default_rng(seed).permutation(len(ds))
    k = max(1, int(round(len(ds) * fraction)))
    return ds.take(np.sort(order[k:])), ds.take(np.sort(order[:k]))
