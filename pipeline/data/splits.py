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
    if data in BUILTIN:  # the shared deterministic split keeps test rows unseen
        fit, val = ds.split("train", cfg.seed), ds.split("validation", cfg.seed)
    else:
        order = np.random.default_rng(cfg.seed).permutation(len(ds))
        k = max(1, int(round(len(ds) * cfg.validation_fraction)))
        fit, val = ds.take(np.sort(order[k:])), ds.take(np.sort(order[:k]))
    if cfg.limit:
        fit = fit.sample(cfg.limit, cfg.seed)
        val = val.sample(max(1, int(cfg.limit * cfg.validation_fraction / (1 - cfg.validation_fraction))), cfg.seed)
    if len(fit) < 2 or len(val) < 1:
        raise ValueError(f"bootstrap data {data!r} has too few usable rows ({len(fit)} train, {len(val)} validation)")
    return fit, val
