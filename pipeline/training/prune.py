"""`offramp prune`: structured pruning of an early-exit artifact's original model (attention heads, feed-forward
neurons), a short recovery by distillation, a check against the float original, new exit thresholds.

1. Importance (pipeline.compression.pruning.unit_importance): Fisher information of each unit under the model's
   own outputs on rows of the bootstrap corpus (as the manifest records it): no labels.
2. Prune each layer's least important share (`heads`, `ffn`), or search the largest share whose check on the
   validation split stays within `max_agreement_loss`.
3. Recovery: `recover_steps` of distillation from the original's logits on the same corpus (soft targets at
   temperature T; dropout off: the target is the original's answer, not a regularised one).
4. The check (compression_check.check) against the float original on held-out rows: agreement, gold accuracy
   where labels exist; over `budget` nothing is written unless `allow_loss`.
5. Ramps: re-bootstrapped on the pruned model (default) or the source's kept; either way thresholds are tuned
   against the float original's answers, so the pruning's loss is counted in the budget they spend.

The artifact's `model/` is the pruned classifier (plain `from_pretrained` loads it); `manifest.original` names the
source artifact, so certificates, reference answers and `offramp verify` measure agreement against the unpruned
original; `manifest.pruning` records what was done and its check.
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from pipeline.compression.pruning import PruningRefused, plan, prune, refusal, unit_importance, widths
from pipeline.data.batching import pad_rows, padded_batches
from pipeline.model.classify import logits_of_rows
from pipeline.training.compression_check import BudgetExceeded

log = logging.getLogger(__name__)

PRUNING_JSON = "pruning.json"
LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

Progress = Callable[[str], Callable] | None
"""A factory: label -> `(done, total, *extra)` callback (pipeline.commands.progress.progress)."""


class PruneConfig(BaseModel):
    """Pruning an early-exit artifact's original model (`offramp prune`)."""

    model_config = ConfigDict(extra="forbid")

    heads: float | None = Field(None, ge=0, lt=1)
    """Share of each layer's attention heads to remove (decoder families; with grouped-query attention the same
    number from every key/value group)."""
    ffn: float | None = Field(None, ge=0, lt=1)
    """Share of each layer's feed-forward neurons to remove."""
    max_agreement_loss: float | None = Field(None, ge=0, lt=1)
    """Instead of shares: the largest pruning (over `levels`, for each kind the family supports and `heads` / `ffn`
    leave open) whose agreement loss against the original on the validation split stays within this."""
    scope: Literal["layer", "global"] = "layer"
    """`layer`: each layer loses the same share, its least important units. `global` (one ranking over all layers)
    is refused: layers would end with different widths, which one config number cannot state."""
    budget: float = Field(0.01, ge=0, lt=1)
    """Largest agreement loss against the original allowed in the held-out check (`max_agreement_loss` when
    searching); over it nothing is written unless `allow_loss`."""
    allow_loss: bool = False
    data: str | None = None
    """Importance and recovery corpus (no labels needed); default: the bootstrap corpus the manifest records."""
    text_column: str | None = None
    check_data: str | None = None
    """Held-out check rows: a built-in dataset (its test split) or a file (all rows). Default: the bootstrap
    corpus's test split when it is a built-in, else its validation split (which importance and recovery never see)."""
    label_column: str = "label"
    check_limit: int | None = Field(None, ge=1)
    importance_rows: int = Field(1024, ge=1)
    """Rows of the corpus the importance is taken on."""
    recover_steps: int = Field(300, ge=0)
    """Distillation steps after pruning (0: none)."""
    recover_check_every: int = Field(100, ge=1)
    """Validation agreement with the original every this many recovery steps; the best step's weights are kept."""
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    temperature: float = Field(2.0, gt=0)
    ramps: Literal["rebootstrap", "keep"] = "rebootstrap"
    """`rebootstrap`: train new ramps on the pruned model (the default: the source's ramps read hidden states the
    pruning changed); `keep`: the source's ramps as they are. Thresholds are tuned against the original's answers
    either way."""
    levels: list[float] = Field(default_factory=lambda: list(LEVELS))
    """The shares `max_agreement_loss` searches (ascending)."""
    multiple: int = Field(8, ge=1)
    """Kept neuron counts are rounded up to a multiple of this (kernels like such widths)."""
    max_length: int | None = Field(None, ge=8)
    """Token limit (default: the artifact's)."""
    seed: int = 0
    device: str = "cpu"


def _shares_text(record: dict) -> str:
    parts = [f"{k} {record[k]:.0%}" for k in ("ffn", "heads") if record.get(k)]
    return ", ".join(parts) or "nothing"


class _Rows:
    """Tokenized texts and the original model's logits on them."""

    def __init__(self, name: str, texts: list[str], labels, tok, max_length: int):
        self.name, self.texts, self.labels = name, list(texts), labels
        self.ids = tok(self.texts, truncation=True, max_length=max_length)["input_ids"]
        self.logits: torch.Tensor | None = None


def _corpus(manifest, cfg: PruneConfig):
    """(bootstrap config, fit rows, validation rows) of the importance / recovery corpus."""
    from pipeline.config import BootstrapConfig
    from pipeline.data.splits import split_data

    boot = manifest.bootstrap or {}
    data = cfg.data or boot.get("data")
    if not data:
        raise ValueError("the manifest names no bootstrap corpus; pass --data (any text corpus, no labels needed)")
    keys = ("seed", "limit", "validation_fraction")
    recorded = {k: boot[k] for k in keys if boot.get(k) is not None} if not cfg.data else {}
    text_column = cfg.text_column or (boot.get("text_column") if not cfg.data else None) or "text"
    poolings = sorted({r.pooling for r in manifest.ramps})
    if len(poolings) != 1:
        raise ValueError(f"the artifact's ramps pool differently ({poolings}); pruning handles one pooling")
    bcfg = BootstrapConfig(data=data, text_column=text_column, max_length=manifest.max_length, pooling=poolings[0],
                           constraint=manifest.constraint, **recorded)
    fit, val = split_data(data, bcfg)
    return bcfg, fit, val


def _check_rows(cfg: PruneConfig, bcfg, val):
    """(name, texts, gold or None) of the held-out check."""
    from pipeline.data.datasets import BUILTIN
    from pipeline.training.compression_check import heldout_texts

    data = cfg.check_data or (bcfg.data if bcfg.data in BUILTIN else None)
    if data is None:
        texts = val.texts[: cfg.check_limit] if cfg.check_limit else val.texts
        return f"{bcfg.data}:validation", texts, None
    return heldout_texts(data, cfg.check_limit, cfg.text_column or "text", cfg.label_column)


def _batches(ids: list, pad_id: int, batch_size: int, device):
    for _, a, m in padded_batches(ids, pad_id, batch_size):
        yield torch.from_numpy(a).to(device), torch.from_numpy(m).to(device)


def _recover(student, fit: _Rows, val: _Rows, head, pad_id: int, cfg: PruneConfig, progress: Progress,
             label: str) -> dict:
    """Distil `student` from the original's logits on the fit rows, in place, keeping the weights of the step
    (0 included) whose agreement with the original on the validation rows was highest: distillation on the rows
    the original was fine-tuned on can drift away from it elsewhere (measured: 25% of MiniLM's neurons pruned
    agreed on 96.6% of held-out rows before recovery and 95.9% after 1,500 steps)."""
    from pipeline.training.distill import _bucketed_batches, kd_loss
    from pipeline.training.loop import train_steps

    if cfg.recover_steps == 0:
        return {"steps": 0}
    t0 = time.perf_counter()
    best = {"step": 0, "agreement": _agreement(head, val.logits, logits_of_rows(student, val.ids, pad_id)),
            "state": copy.deepcopy(student.state_dict())}
    history = [(0, best["agreement"])]

    def keep_best(step: int) -> None:
        if step % cfg.recover_check_every and step != cfg.recover_steps:
            return
        student.eval()
        a = _agreement(head, val.logits, logits_of_rows(student, val.ids, pad_id))
        history.append((step, round(a, 5)))
        if a > best["agreement"]:
            best.update(step=step, agreement=a, state=copy.deepcopy(student.state_dict()))

    dropouts = [(m, m.p) for m in student.modules() if isinstance(m, torch.nn.Dropout)]
    for m, _ in dropouts:
        m.p = 0.0  # the target is the original's answer on this row; dropout only blurs it
    device = next(student.parameters()).device
    lengths = np.array([len(r) for r in fit.ids])
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    last = []

    def loss_of(b):
        ids, mask = (torch.from_numpy(a).to(device) for a in pad_rows([fit.ids[i] for i in b], pad_id))
        logits = student(input_ids=ids, attention_mask=mask).logits
        loss = kd_loss(logits.float(), fit.logits[torch.as_tensor(b)].to(device), None, cfg.temperature, 1.0)
        last.append(float(loss.detach()))
        return loss

    for p in student.parameters():
        p.requires_grad_(True)
    try:
        steps = train_steps(student, lambda: _bucketed_batches(lengths, cfg.batch_size, rng), loss_of,
                            cfg.recover_steps, cfg.learning_rate, progress(label) if progress else None, keep_best)
    finally:
        for m, p in dropouts:
            m.p = p
        student.eval()
    student.load_state_dict(best["state"])
    return {"steps": steps, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
            "temperature": cfg.temperature, "rows": len(fit.ids), "data": fit.name,
            "final_loss": float(np.mean(last[-20:])) if last else None,
            "kept_step": best["step"], "validation_agreement_by_step": history,
            "seconds": round(time.perf_counter() - t0, 1)}


def _agreement(head, ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    return float((head.decide(ref_logits).answer == head.decide(logits).answer).float().mean())


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _candidate(original, importance, ffn, heads, fit, val, pad_id, cfg, head, progress, label):
    """(pruned and recovered model, its record)."""
    kept = plan(original, importance, ffn=ffn or None, heads=heads or None, multiple=cfg.multiple)
    model = prune(original, kept)
    recovery = _recover(model, fit, val, head, pad_id, cfg, progress, label)
    val_logits = logits_of_rows(model, val.ids, pad_id)
    rec = {"ffn": ffn or 0.0, "heads": heads or 0.0, "widths": widths(model), "params": _params(model),
           "validation_agreement": _agreement(head, val.logits, val_logits), "recovery": recovery,
           "kept": {"ffn": kept.ffn, "heads": kept.heads}}
    return model, rec


def _search(original, importance, fixed: dict, open_kinds: list[str], target: float, fit, val, pad_id, cfg, head,
            progress) -> tuple:
    """The largest level in cfg.levels whose validation loss is within `target` (binary search: loss grows with the
    share). Returns (model, record, tried)."""
    levels = sorted(cfg.levels)
    tried, best = [], None
    lo, hi = 0, len(levels) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        shares = {**fixed, **{k: levels[mid] for k in open_kinds}}
        model, rec = _candidate(original, importance, shares.get("ffn"), shares.get("heads"), fit, val, pad_id, cfg,
                                head, progress, f"prune {_shares_text(shares)}: recover step")
        rec["within"] = 1.0 - rec["validation_agreement"] <= target + 1e-12
        tried.append(rec)
        log.info("prune search: %s -> validation agreement %.4f", _shares_text(shares), rec["validation_agreement"])
        if rec["within"]:
            best, lo = (model, rec), mid + 1
        else:
            hi = mid - 1
    if best is None:
        low = min(tried, key=lambda r: max(r["ffn"], r["heads"]))
        raise ValueError(f"no pruning in {levels} stays within --max-agreement-loss {target:.2%} on "
                         f"{val.name}: the smallest tried ({_shares_text(low)}) agrees on "
                         f"{low['validation_agreement']:.2%}; give more --recover-steps or a larger loss")
    return best[0], best[1], tried


def _tune(conf, pred, final, reference, manifest, headroom: float):
    from pipeline.control.deployment import cost_model
    from pipeline.control.tuner import evaluate, tune_thresholds
    from pipeline.feedback import FeedbackWindow

    window = FeedbackWindow(conf, pred, final, reference=reference)
    costs = cost_model(manifest)
    tuned = tune_thresholds(window, costs, constraint=manifest.constraint * headroom)
    return tuned, costs, evaluate


def _ramp_outputs(ee, tok, texts, max_length, batch_size=64):
    from pipeline.training.bootstrap import collect_features, ramp_outputs

    pooled, logits = collect_features(ee.parts, ee.ramps.layers, tok, texts, batch_size, max_length,
                                      ee.ramps.ramps[0].pooling)  # one pooling for all ramps (checked in _corpus)
    conf, pred = ramp_outputs(ee.ramps, pooled, ee.head_kind)
    return conf, pred, ee.head_kind.decide(logits).answer.numpy()


def prune_artifact(src: str, out: str, cfg: PruneConfig, progress: Progress = None,
                   original: str | None = None) -> dict:
    """Prune the original model of the early-exit artifact `src` into a new artifact at `out`; returns the record
    written to its manifest (`pruning`). `original`: what `manifest.original` says (default: `src` relative to
    `out`). Raises BudgetExceeded (writing nothing) over budget without `allow_loss`, PruningRefused (a ValueError)
    for what the family's config cannot express."""
    from pipeline.model.artifact import load_classifier, load_tokenizer, read_manifest
    from pipeline.model.heads import head_kind

    t0 = time.perf_counter()
    src_dir, out_dir = Path(src), Path(out)
    if not (src_dir / "manifest.json").exists():
        raise FileNotFoundError(f"--model {src!r} is not an early-exit artifact (no manifest.json); create one with "
                                "`offramp bootstrap` (pruning works on an artifact, so its ramps come along)")
    if out_dir.resolve() == src_dir.resolve():
        raise ValueError(f"--out {out!r} is the source artifact; write the pruned one somewhere else")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"--out {out!r} exists and is not empty; choose a new directory")
    manifest = read_manifest(src_dir)
    if manifest.compression:
        raise ValueError(f"{src!r} is compressed ({manifest.compression.get('method')}); prune its float source "
                         f"({manifest.compression.get('source', 'the artifact it was made from')}), then quantize "
                         "the pruned artifact")
    if manifest.original or getattr(manifest, "pruning", None):
        raise ValueError(f"{src!r} is already pruned from {manifest.original!r}; prune that original with larger "
                         "shares instead (each pruning is checked against the float original)")
    if cfg.scope == "global":
        raise PruningRefused("--scope global ranks units over all layers, so layers would end with different widths; "
                             "transformers configs hold one intermediate_size (and one num_attention_heads) for every "
                             "layer, so it cannot be loaded with from_pretrained. Use --scope layer (the default)")
    searching = cfg.max_agreement_loss is not None
    if not searching and not (cfg.ffn or cfg.heads):
        raise ValueError("nothing to prune: give --ffn and/or --heads (shares to remove), or --max-agreement-loss")

    device = torch.device(cfg.device)
    model_dir = str(src_dir / "model")
    hf = load_classifier(model_dir).to(device=device, dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    pad_id = tok.pad_token_id or 0
    head = head_kind(hf.config, manifest.head)
    supported = {"ffn": refusal(hf, None, 0.5) is None, "heads": refusal(hf, 0.5, None) is None}
    if reason := refusal(hf, cfg.heads, cfg.ffn):
        raise PruningRefused(reason)
    open_kinds = [k for k in ("ffn", "heads") if supported[k] and getattr(cfg, k) is None] if searching else []
    if searching and not open_kinds:
        raise ValueError("--max-agreement-loss searches the shares you leave open, and --ffn / --heads fix every "
                         "kind this family can prune; drop one of them")

    max_length = min(cfg.max_length or manifest.max_length, manifest.max_length)
    bcfg, fit_ds, val_ds = _corpus(manifest, cfg)
    fit = _Rows(f"{bcfg.data}:train", fit_ds.texts, None, tok, max_length)
    val = _Rows(f"{bcfg.data}:validation", val_ds.texts, None, tok, max_length)
    check_name, check_texts, gold = _check_rows(cfg, bcfg, val_ds)
    check = _Rows(check_name, check_texts, gold, tok, max_length)
    show = (lambda label: progress(label)) if progress else (lambda label: None)
    fit.logits = logits_of_rows(hf, fit.ids, pad_id, progress=show("prune: original's logits (recovery targets)"))
    val.logits = logits_of_rows(hf, val.ids, pad_id)
    check.logits = logits_of_rows(hf, check.ids, pad_id)

    # importance on a seeded sample of the corpus, under the model's own outputs
    t_imp = time.perf_counter()
    pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(fit.ids))[: cfg.importance_rows])
    imp_ids = [fit.ids[i] for i in pick]
    want_heads = supported["heads"] and (bool(cfg.heads) or "heads" in open_kinds)
    importance = unit_importance(hf, _batches(imp_ids, pad_id, 32, device), head.transform, heads=want_heads,
                                 progress=show("prune: importance rows"), total_rows=len(imp_ids))
    imp_seconds = round(time.perf_counter() - t_imp, 1)

    tried = None
    if searching:
        fixed = {k: getattr(cfg, k) for k in ("ffn", "heads") if getattr(cfg, k)}
        pruned, rec, tried = _search(hf, importance, fixed, open_kinds, cfg.max_agreement_loss, fit, val, pad_id,
                                     cfg, head, progress)
        budget = cfg.max_agreement_loss
    else:
        pruned, rec = _candidate(hf, importance, cfg.ffn, cfg.heads, fit, val, pad_id, cfg, head, progress,
                                 "prune: recover step")
        budget = cfg.budget

    from pipeline.training.compression_check import check as check_of

    t_check = time.perf_counter()
    result = check_of(check.logits, logits_of_rows(pruned, check.ids, pad_id), gold, check.name, budget, head)
    result["device"] = str(device)
    result["seconds"] = round(time.perf_counter() - t_check, 2)
    record = {
        "method": "structured",
        "library": _library(),
        "scope": cfg.scope,
        "ffn": rec["ffn"],
        "heads": rec["heads"],
        "widths_before": widths(hf),
        "widths_after": rec["widths"],
        "params_before": _params(hf),
        "params_after": rec["params"],
        "importance": {"method": "fisher (model's own output distribution, no labels)", "data": fit.name,
                       "rows": importance.rows, "seconds": imp_seconds},
        "recovery": rec["recovery"],
        "validation_agreement": rec["validation_agreement"],
        "search": None if tried is None else {"max_agreement_loss": cfg.max_agreement_loss, "data": val.name,
                                              "tried": [{k: r[k] for k in ("ffn", "heads", "validation_agreement",
                                                                           "within")} for r in tried]},
        "check": result,
        "source": str(src),
    }
    if not result["within_budget"] and not cfg.allow_loss:
        raise BudgetExceeded(record, f"pruning ({_shares_text(record)})", "the original",
                             "Prune less, give more --recover-steps, use --max-agreement-loss to search, or pass "
                             "--allow-loss")

    ramps_rec = _write_artifact(src_dir, out_dir, manifest, pruned, tok, head, bcfg, val, check, max_length, cfg,
                                {"importance": importance.to_dict(), "kept": rec["kept"]}, original, progress)
    record["ramps"] = ramps_rec
    record["seconds"] = round(time.perf_counter() - t0, 1)
    from pipeline.model.artifact import write_manifest

    m = read_manifest(out_dir)
    m.pruning = record
    write_manifest(out_dir, m)
    return record


def _library() -> str:
    try:
        from importlib.metadata import version

        return f"torch-pruning {version('torch-pruning')}"
    except Exception:  # noqa: BLE001
        return "torch-pruning"


def _write_artifact(src_dir: Path, out_dir: Path, manifest, pruned, tok, head, bcfg, val: _Rows, check: _Rows,
                    max_length: int, cfg: PruneConfig, detail: dict, original: str | None, progress) -> dict:
    """Ramps for the pruned model (re-bootstrapped or kept), thresholds tuned against the original's answers, the
    artifact written at `out_dir`. Returns the ramps' record."""
    import json

    from pipeline.model.artifact import (
        load_float_artifact,
        save_artifact,
        save_validation_feedback,
        write_manifest,
    )
    from pipeline.model.early_exit import EarlyExitModel
    from pipeline.model.profile import measure_profile
    from pipeline.training.bootstrap import bootstrap

    t0 = time.perf_counter()
    new = manifest.model_copy(deep=True)
    if cfg.ramps == "rebootstrap":
        from pipeline.config import BootstrapConfig

        boot = dict(bcfg.model_dump())
        boot.update(temperature=manifest.bootstrap.get("temperature", 2.0), epochs=manifest.bootstrap.get("epochs", 30))
        if head.kind == "regression":
            boot["regression_bins"] = manifest.head.get("values")
        elif head.kind == "multi_label":
            boot["label_threshold"] = manifest.head.get("label_threshold", 0.5)
        with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
            pruned.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            bootstrap(tmp, str(out_dir), BootstrapConfig(**boot),
                      progress=progress("prune: ramp features") if progress else None)
        ee, _, new = load_float_artifact(out_dir)
        new.bootstrap["source_model"] = f"{src_dir}/model, pruned"
    else:
        src_ee, _, _ = load_float_artifact(src_dir)
        ee = EarlyExitModel(pruned, src_ee.ramps, src_ee.head_kind).eval()
        new.profile = measure_profile(ee)
    conf, pred, final = _ramp_outputs(ee, tok, val.texts, max_length)
    reference = head.decide(val.logits).answer.numpy()
    tuned, costs, evaluate = _tune(conf, pred, final, reference, new, bcfg.tune_headroom)
    c_conf, c_pred, c_final = _ramp_outputs(ee, tok, check.texts, max_length)
    from pipeline.feedback import FeedbackWindow

    c_ref = head.decide(check.logits).answer.numpy()
    held = evaluate(FeedbackWindow(c_conf, c_pred, c_final, reference=c_ref), costs, tuned.thresholds, new.active)
    agree_own = (pred == final[:, None]).mean(0)
    for r, info in enumerate(new.ramps):
        info.val_agreement = float(agree_own[r])
    new.thresholds = [float(t) for t in tuned.thresholds]
    new.compression = None
    if original is None:
        original = os.path.relpath(src_dir.resolve(), out_dir.resolve())
    new.original = original
    if cfg.ramps == "keep":
        save_artifact(out_dir, pruned, tok, ee.ramps, new)
    else:
        write_manifest(out_dir, new)
    save_validation_feedback(out_dir, conf, pred, final)
    (out_dir / PRUNING_JSON).write_text(json.dumps(detail))  # per-unit importance and the kept indices
    return {
        "mode": cfg.ramps,
        "constraint": new.constraint * bcfg.tune_headroom,
        "validation_data": val.name,
        "validation_agreement": float(tuned.agreement),
        "validation_layer_savings": float(tuned.layer_savings),
        "check_data": check.name,
        "check_exit_agreement": float(held.agreement),
        "check_layer_savings": float(held.layer_savings),
        "seconds": round(time.perf_counter() - t0, 1),
    }

