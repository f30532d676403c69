"""Bootstrap ramps: freeze the original model, train a ramp at every cut point by distillation.

The targets are the original model's own output distribution (temperature T), so no labels are
needed. The encoder runs once over the data; every ramp trains on the cached pooled features
of its layer at the same time, which makes training seconds, not minutes.

Besides the ramps, the artifact gets every ramp's output on the validation split
(``validation_feedback.safetensors``): a fresh controller tunes on it before its first live window.
For an artifact made before that file existed, ``offramp validation-feedback EE_DIR`` runs the
saved model over the validation split once more and writes only that file.
"""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from pipeline.config import BootstrapConfig
from pipeline.data.datasets import TextDataset
from pipeline.data.batching import padded_batches
from pipeline.data.splits import split_data
from pipeline.engine.loader import load_artifact
from pipeline.model.artifact import (
    Manifest,
    RampInfo,
    cost_arrays,
    load_classifier,
    load_tokenizer,
    model_max_length,
    read_manifest,
    save_artifact,
    save_validation_feedback,
)
from pipeline.model.early_exit import EarlyExitModel, attention_kernels
from pipeline.model.families import Backbone, backbone
from pipeline.model.heads import HeadKind, head_from_scores
from pipeline.model.profile import measure_profile
from pipeline.model.ramps import RampSet, pool

log = logging.getLogger(__name__)


@torch.inference_mode()
def collect_features(parts: Backbone, ramp_layers: list[int], tokenizer, texts: list[str], batch_size: int,
                     max_length: int, pooling: str, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """pooled [N,R,H] after every layer in `ramp_layers` (1-based) and the original head's logits [N,C], in
    input order."""
    rows = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    at = {layer: r for r, layer in enumerate(ramp_layers)}
    pooled = torch.empty(len(texts), len(ramp_layers), parts.hidden_size)
    logits = torch.empty(len(texts), int(parts.config.num_labels))
    device = next(parts.model.parameters()).device
    done = 0
    for idx, ids, mask in padded_batches(rows, tokenizer.pad_token_id or 0, batch_size):
        idx, ids, mask = torch.from_numpy(idx), torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        h = parts.embed(ids, None)
        with attention_kernels(h):
            state = parts.layer_state(h, mask)
            for i in range(parts.num_layers):
                h = parts.layer(i, h, state)
                r = at.get(i + 1)
                if r is not None:
                    pooled[idx, r] = pool(h, mask, pooling).float().cpu()
        logits[idx] = parts.head(h, mask).float().cpu()
        done += len(idx)
        if progress:
            progress(done, len(texts))
    return pooled, logits


def train_ramps(ramps: RampSet, pooled: torch.Tensor, teacher_logits: torch.Tensor, cfg: BootstrapConfig,
                head: HeadKind) -> list[float]:
    """Distillation from the original head's outputs (soft targets, as the head's kind defines them), all ramps
    at once. Returns the last epoch's mean loss per ramp."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(ramps.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    T = cfg.temperature
    target = head.ramp_targets(teacher_logits, T)  # [N,ramp_outputs]
    n = len(pooled)
    losses = np.zeros(len(ramps))
    ramps.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n)
        losses[:] = 0
        for start in range(0, n, 256):
            b = perm[start : start + 256]
            total = 0.0
            for r, ramp in enumerate(ramps.ramps):
                loss = head.ramp_loss(ramp.forward_pooled(pooled[b, r]), target[b], T)
                total = total + loss
                losses[r] += float(loss.detach()) * len(b) / n
            opt.zero_grad()
            total.backward()
            opt.step()
    ramps.eval()
    return losses.tolist()


@torch.inference_mode()
def ramp_outputs(ramps: RampSet, pooled: torch.Tensor, head: HeadKind) -> tuple[np.ndarray, np.ndarray]:
    """conf [N,R], pred [N,R] (answer ids) of every ramp on cached features."""
    conf, pred = [], []
    for r, ramp in enumerate(ramps.ramps):
        d = head.decide_ramp(ramp.forward_pooled(pooled[:, r]))
        conf.append(d.conf)
        pred.append(d.answer)
    return torch.stack(conf, 1).numpy(), torch.stack(pred, 1).numpy()


def bootstrap(model_dir: str, out: str, cfg: BootstrapConfig | None = None, progress=None) -> Manifest:
    from pipeline.control.tuner import evaluate, tune_thresholds
    from pipeline.feedback import CostModel, FeedbackWindow

    cfg = cfg or BootstrapConfig()
    t0 = time.perf_counter()
    hf = load_classifier(model_dir)
    for p in hf.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(model_dir)
    parts = backbone(hf)
    num_layers, hidden = parts.num_layers, parts.hidden_size
    if num_layers < 2:
        raise ValueError(f"{model_dir!r} has {num_layers} layer; ramps need at least 2")
    pooling = parts.ramp_pooling if cfg.pooling == "auto" else cfg.pooling
    layers = list(range(1, num_layers))  # a ramp after every layer but the last (the original head is there)
    max_length = min(cfg.max_length, model_max_length(hf.config, tok))

    fit, val = split_data(cfg.data, cfg)
    log.info("bootstrap: caching features of %d + %d rows", len(fit), len(val))
    # Features first: the ramps' size depends on the head's kind, and a regression's bins on its scores.
    f_pooled, f_logits = collect_features(parts, layers, tok, fit.texts, cfg.batch_size, max_length, pooling, progress)
    v_pooled, v_logits = collect_features(parts, layers, tok, val.texts, cfg.batch_size, max_length, pooling)
    t_feat = time.perf_counter() - t0
    head = head_from_scores(hf.config, f_logits, cfg.regression_bins, cfg.label_threshold)
    ramps = RampSet(layers, hidden, head.ramp_outputs, pooling)
    model = EarlyExitModel(hf, ramps, head)
    losses = train_ramps(ramps, f_pooled, f_logits, cfg, head)

    conf, pred = ramp_outputs(ramps, v_pooled, head)
    final = head.decide(v_logits).answer.numpy()
    agreement = (pred == final[:, None]).mean(0)
    profile = measure_profile(model)
    layer_costs, ramp_costs = cost_arrays(profile, num_layers, len(layers))
    costs = CostModel(layer_costs=layer_costs, ramp_layers=np.array(layers), ramp_costs=ramp_costs)
    window = FeedbackWindow(conf=conf.astype(np.float32), pred=pred.astype(np.int64), final=final.astype(np.int64))
    tuned = tune_thresholds(window, costs, constraint=cfg.constraint * cfg.tune_headroom)
    outcome = evaluate(window, costs, tuned.thresholds, np.ones(len(layers), bool))

    manifest = Manifest(
        family=model.parts.family,
        num_layers=num_layers,
        hidden_size=hidden,
        num_labels=hf.config.num_labels,
        label_names=head.label_names,
        max_length=max_length,
        head=head.to_dict(),
        ramps=[RampInfo(layer=l, pooling=pooling, val_agreement=float(a)) for l, a in zip(layers, agreement)],
        thresholds=[float(t) for t in tuned.thresholds],
        active=[True] * len(layers),
        constraint=cfg.constraint,
        profile=profile,
        bootstrap={
            "data": cfg.data,
            "text_column": cfg.text_column,
            "seed": cfg.seed,
            "limit": cfg.limit,
            "validation_fraction": cfg.validation_fraction,
            "train_rows": len(fit),
            "validation_rows": len(val),
            "temperature": cfg.temperature,
            "epochs": cfg.epochs,
            "final_kd_loss": losses,
            "validation_agreement_at_thresholds": float(outcome.agreement),
            "validation_savings_at_thresholds": float(outcome.savings),
            "validation_layer_savings_at_thresholds": float(outcome.layer_savings),
            "validation_exit_counts": [int(c) for c in outcome.exit_counts],
            "feature_seconds": round(t_feat, 2),
            "seconds": round(time.perf_counter() - t0, 2),
            "source_model": str(model_dir),
        },
    )
    save_artifact(out, hf, tok, ramps, manifest)
    save_validation_feedback(out, conf, pred, final)
    return manifest


def validation_split(manifest, data: str | None = None,
                     where: str = "the artifact") -> tuple[BootstrapConfig, TextDataset]:
    """(config, validation split) of the bootstrap that made ``manifest``, rebuilt with bootstrap's rule from
    ``data`` (default: the manifest's) and the split settings the manifest records (older manifests: the
    defaults). Raises ValueError when there is no data to rebuild from or the row count differs."""
    data = data or manifest.bootstrap.get("data")
    if not data:
        raise ValueError(f"{where}: the manifest names no bootstrap data; pass data=")
    poolings = sorted({r.pooling for r in manifest.ramps})
    if len(poolings) != 1:
        raise ValueError(f"{where}: ramps pool differently ({poolings}); only one pooling is supported here")
    split_keys = ("text_column", "seed", "limit", "validation_fraction")
    recorded = {k: manifest.bootstrap[k] for k in split_keys if manifest.bootstrap.get(k) is not None}
    cfg = BootstrapConfig(data=data, pooling=poolings[0], max_length=manifest.max_length, **recorded)
    _, val = split_data(data, cfg)
    expected = manifest.bootstrap.get("validation_rows")
    if expected is not None and expected != len(val):
        raise ValueError(f"{data!r} gives {len(val)} validation rows, {where} was bootstrapped on {expected} "
                         "(another seed, limit or file?): re-run `offramp bootstrap`")
    return cfg, val


def write_validation_feedback(artifact_dir: str, data: str | None = None, batch_size: int = 64,
                              progress=None) -> dict:
    """Recompute only ``validation_feedback.safetensors`` of a saved artifact (no ramp training).

    The validation split is rebuilt with bootstrap's rule from ``data`` (default: the manifest's bootstrap
    data) and the split settings the manifest records (older manifests: the defaults); its row count must
    match the manifest's. Returns a small report (rows, per-ramp agreement recomputed vs the manifest's,
    seconds).
    """
    t0 = time.perf_counter()
    manifest = read_manifest(artifact_dir)
    cfg, val = validation_split(manifest, data, str(artifact_dir))
    model, tok, _ = load_artifact(artifact_dir, slow_compression="apply")  # the controller's warm start: its numerics
    pooled, logits = collect_features(model.parts, model.ramps.layers, tok, val.texts, batch_size, manifest.max_length,
                                      cfg.pooling, progress)
    conf, pred = ramp_outputs(model.ramps, pooled, model.head_kind)
    final = model.head_kind.decide(logits).answer.numpy()
    path = save_validation_feedback(artifact_dir, conf, pred, final)
    return {
        "path": str(path),
        "rows": len(val),
        "agreement": [float(a) for a in (pred == final[:, None]).mean(0)],
        "manifest_agreement": [r.val_agreement for r in manifest.ramps],
        "seconds": round(time.perf_counter() - t0, 2),
    }
