"""Families benchmark (`offramp bench families`): does the machinery hold on every architecture it steps through?

Only MiniLM-L6 has real pretrained weights offline, so for each family this builds a small model of that
architecture from random weights (`save_pretrained` + the packaged MiniLM tokenizer), fine-tunes it on movie
reviews for a capped number of steps (`offramp finetune`'s code), bootstraps its ramps, runs the certified job of
the job YAML on the movie-review corpus and checks every answered row with `offramp verify` (the float original in
plain transformers). Per family: the layer work the exits saved, the certificate (agreement, exact
interval, certified) and the true agreement beside it. Absolute accuracy is low (minutes of training from random
weights); the figures are about the machinery. The fine-tuned models and their ramps are cached under
artifacts/families/ (keyed by family, size and steps), so a rerun only runs the jobs.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.bench import machine, timed_job, write_result

# One representative per family module (pipeline/model/families); gemma2 / gemma3_text can be asked for by name.
FAMILIES = ("bert", "distilbert", "roberta", "deberta_v2", "modernbert", "electra", "albert", "mpnet",
            "llama", "qwen2", "qwen3", "mistral", "gemma")
EXTRA = ("gemma2", "gemma3_text")
DECODERS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")
LAYERS, HIDDEN = 6, 128
MAX_STEPS = 600
"""About 2.5 minutes of training per family at 6 x 128 on one thread of this machine (~0.25 s per step of 32 rows)."""
THREADS = 1
"""Torch threads for this process's own work (fine-tuning, bootstrap, verify). On a 2-core machine shared with
other work, two threads measured 10-20x slower per step than one (each waits at OpenMP barriers for a core another
process holds); the job's actors keep the YAML's settings."""
LEARNING_RATE = 5e-4
"""Random weights need a larger step than fine-tuning a pretrained model (finetune's default 5e-5)."""


def model_config(family: str, layers: int = LAYERS, hidden: int = HIDDEN, num_labels: int = 2):
    """A small transformers config of `family`: `layers` x `hidden`, 4 heads, MLP 4x hidden, the MiniLM tokenizer's
    vocabulary and special ids (pad 0, [CLS] 101, [SEP] 102); decoders with the pad id set (their head reads the
    last non-pad token) and grouped-query attention where the family has it."""
    import transformers as tf

    from pipeline.model.artifact import load_tokenizer

    if family not in FAMILIES + EXTRA:
        raise ValueError(f"unknown family {family!r}; one of {', '.join(FAMILIES + EXTRA)}")
    if hidden % 64:
        raise ValueError(f"hidden {hidden} must be a multiple of 64 (4 heads of 16+)")
    tok = load_tokenizer("minilm-l6")
    vocab, pad, cls, sep = len(tok), tok.pad_token_id, tok.cls_token_id, tok.sep_token_id
    heads = 4
    labels = {"num_labels": num_labels, "id2label": {i: str(i) for i in range(num_labels)},
              "label2id": {str(i): i for i in range(num_labels)}}
    # 130 positions: rows of up to 128 tokens (finetune / bootstrap / the job cut there) plus RoBERTa's and MPNet's
    # padding offset of 2.
    enc = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
               intermediate_size=4 * hidden, max_position_embeddings=130, pad_token_id=pad, **labels)
    dec = dict(enc, num_key_value_heads=heads // 2, head_dim=hidden // heads, bos_token_id=cls, eos_token_id=sep,
               max_position_embeddings=128)
    if family == "bert":
        return tf.BertConfig(**enc)
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden,
                                   max_position_embeddings=128, pad_token_id=pad, **labels)
    if family == "roberta":
        return tf.RobertaConfig(bos_token_id=cls, eos_token_id=sep, **enc)
    if family == "deberta_v2":  # DeBERTa-v3's settings: log-bucketed relative attention, no absolute positions
        return tf.DebertaV2Config(relative_attention=True, position_buckets=64, max_relative_positions=128,
                                  pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True,
                                  position_biased_input=False, type_vocab_size=0, pooler_hidden_size=hidden, **enc)
    if family == "modernbert":  # global attention every 2nd layer, a 32-token sliding window between
        return tf.ModernBertConfig(global_attn_every_n_layers=2, local_attention=32, cls_token_id=cls,
                                   sep_token_id=sep, bos_token_id=cls, eos_token_id=sep, **enc)
    if family == "electra":  # embedding size != hidden: the embeddings projection runs
        return tf.ElectraConfig(embedding_size=hidden // 2, **enc)
    if family == "albert":  # one shared layer group applied `layers` times
        return tf.AlbertConfig(embedding_size=hidden // 2, num_hidden_groups=1, inner_group_num=1, **enc)
    if family == "mpnet":
        return tf.MPNetConfig(bos_token_id=cls, eos_token_id=sep, **enc)
    if family == "llama":
        return tf.LlamaConfig(**dec)
    if family == "qwen2":
        return tf.Qwen2Config(**dec)
    if family == "qwen3":
        return tf.Qwen3Config(**dec)
    if family == "mistral":  # a 32-token sliding window on every layer (Mistral's, scaled to sentences)
        return tf.MistralConfig(sliding_window=32, **dec)
    if family == "gemma":
        return tf.GemmaConfig(**dec)
    if family == "gemma2":
        return tf.Gemma2Config(sliding_window=32, **dec)
    return tf.Gemma3TextConfig(sliding_window=32, **dec)  # gemma3_text


def build_model_dir(path: str | Path, family: str, layers: int = LAYERS, hidden: int = HIDDEN, seed: int = 0) -> str:
    """A random-weight `...ForSequenceClassification` of `family` saved like a user's model (safetensors + the
    packaged MiniLM tokenizer), ready for `offramp finetune --base PATH`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipeline.model.artifact import load_tokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(model_config(family, layers, hidden))
    model.save_pretrained(str(path), safe_serialization=True)
    load_tokenizer("minilm-l6").save_pretrained(str(path))
    return str(path)


def _prepare(family: str, layers: int, hidden: int, max_steps: int, cache: Path, echo) -> tuple[Path, Path, dict]:
    """Fine-tuned model and its early-exit artifact for `family`, from the cache or made now."""
    from pipeline.config import BootstrapConfig, FinetuneConfig
    from pipeline.training.bootstrap import bootstrap
    from pipeline.training.finetune import finetune

    home = cache / f"{family}-L{layers}-H{hidden}-steps{max_steps}"
    model_dir, ee_dir = home / "model", home / "ee"
    timing = json.loads((home / "timing.json").read_text()) if (home / "timing.json").exists() else {}
    if not (model_dir / "eval.json").exists():
        init = Path(tempfile.mkdtemp(prefix=f"offramp-{family}-init-"))
        try:
            build_model_dir(init, family, layers, hidden)
            echo(f"  {family}: fine-tuning from random weights, {max_steps} steps -> {model_dir}")
            finetune(str(model_dir), FinetuneConfig(base=str(init), dataset="movie-reviews", max_steps=max_steps,
                                                    learning_rate=LEARNING_RATE))
        finally:
            shutil.rmtree(init, ignore_errors=True)
        shutil.rmtree(ee_dir, ignore_errors=True)
    if not (ee_dir / "manifest.json").exists():
        echo(f"  {family}: bootstrapping ramps -> {ee_dir}")
        t = time.perf_counter()
        bootstrap(str(model_dir), str(ee_dir), BootstrapConfig())
        timing["bootstrap_seconds"] = round(time.perf_counter() - t, 1)
        (home / "timing.json").write_text(json.dumps(timing))
    return model_dir, ee_dir, timing


def _job(config: str, ee_dir: Path, out: Path, name: str) -> tuple[dict, float]:
    """The certified job of `config` (its engine, actors and certification settings) on `ee_dir`, into `out`."""
    from pipeline.config import JobConfig

    cfg = JobConfig.from_yaml(config, model=str(ee_dir))
    return timed_job(cfg, out, f"families-{name}", certify={"enabled": True, "on_uncertified": "warn"})


def measure_family(family: str, layers: int, hidden: int, max_steps: int, config: str, cache: Path, work: Path,
                   echo=print) -> dict:
    """One family end to end: build, fine-tune, bootstrap (cached), certified job, verify. Returns its row."""
    from pipeline.model.artifact import read_manifest
    from pipeline.offline.verify import verify

    model_dir, ee_dir, timing = _prepare(family, layers, hidden, max_steps, cache, echo)
    ev = json.loads((model_dir / "eval.json").read_text())
    manifest = read_manifest(str(ee_dir))
    model_cfg = json.loads((model_dir / "config.json").read_text())
    echo(f"  {family}: certified job on the movie-review corpus")
    out = work / family
    summary, seconds = _job(config, ee_dir, out, family)
    echo(f"  {family}: verify, every answered row")
    report = verify(str(out), echo=lambda m: None)
    cert = summary.get("certificate") or {}
    per_worker = summary.get("precision_per_worker") or {}  # worker -> "bfloat16 (auto: why)"
    precisions = sorted({p.split()[0] for p in per_worker.values() if p})
    return {
        "family": family,
        "transformers_class": (model_cfg.get("architectures") or ["?"])[0],
        "decoder": family in DECODERS,
        "layers": manifest.num_layers, "hidden": manifest.hidden_size,
        "ramps": len(manifest.ramps), "ramp_pooling": manifest.ramps[0].pooling if manifest.ramps else None,
        "train_steps": ev["steps"], "train_seconds": ev["train_seconds"],
        "seconds_per_step": round(ev["train_seconds"] / max(1, ev["steps"]), 3),
        "test_accuracy": ev.get("test_accuracy"),
        "bootstrap_seconds": timing.get("bootstrap_seconds"),
        "rows": summary["rows"],
        "precision": ",".join(precisions) or None, "precision_per_worker": per_worker,
        "layer_compute_saved": summary.get("layer_compute_saved"),
        "layer_compute_saved_actual": summary.get("layer_compute_saved_actual"),
        "mean_exit_layer": summary.get("mean_exit_layer"),
        "promise": cert.get("promise"),
        "claimed": cert.get("agreement"), "claimed_interval": cert.get("interval"),
        "certified": cert.get("certified"), "answer_with": cert.get("answer_with"),
        "true_agreement": report["agreement"], "disagreements": report["disagreements"],
        "interval_contains_truth": report.get("claim_interval_contains_truth"),
        "job_seconds": round(seconds, 1), "rows_per_s": summary.get("rows_per_s"),
        "model_dir": str(model_dir), "artifact": str(ee_dir),
    }


def run_families_bench(families: list[str] | str = FAMILIES, max_steps: int = MAX_STEPS, layers: int = LAYERS,
                       hidden: int = HIDDEN, config: str = "configs/jobs/movie_reviews.yaml",
                       cache: str = "artifacts/families", out_json: str = "bench_results/families.json",
                       threads: int = THREADS, echo=print) -> dict:
    import torch

    families = families.split(",") if isinstance(families, str) else list(families)
    unknown = [f for f in families if f not in FAMILIES + EXTRA]
    if unknown:
        raise ValueError(f"unknown families {unknown}; choose from {', '.join(FAMILIES + EXTRA)}")
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="offramp-families-"))
    results, failures = [], {}
    try:
        for family in families:
            echo(f"{family}:")
            try:
                row = measure_family(family, layers, hidden, max_steps, config, Path(cache), work, echo)
            except Exception as e:  # one family failing must not lose the others' rows; it is reported
                failures[family] = f"{type(e).__name__}: {e}"
                echo(f"  {family}: FAILED {failures[family]}")
                continue
            results.append(row)
            echo("  " + format_row(row))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"config": config, "layers": layers, "hidden": hidden, "max_steps": max_steps,
              "learning_rate": LEARNING_RATE, "threads": threads, "machine": machine(), "results": results,
              "failures": failures}
    echo(format_table(results))
    write_result(result, out_json, echo)
    return result


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


HEADER = ("| family | transformers class | layers x hidden | ramps | test acc. (fine-tuned) | s/step | precision | "
          "layer work saved (answers / actual) | certificate: agreement [95% interval] | certified | "
          "true agreement (verify) | interval holds truth |")


def format_row(r: dict) -> str:
    """One family's line of the markdown table."""
    iv = r.get("claimed_interval")
    claim = _pct(r.get("claimed")) + (f" [{_pct(iv[0])}, {_pct(iv[1])}]" if iv else "")
    certified = {True: "yes", False: "no", None: "-"}[r.get("certified")]
    if r.get("answer_with") == "original":
        certified += " (the original answered the bulk)"
    holds = {True: "yes", False: "NO", None: "-"}[r.get("interval_contains_truth")]
    acc = "-" if r.get("test_accuracy") is None else f"{r['test_accuracy']:.3f}"
    return (f"| {r['family']} | {r['transformers_class']} | {r['layers']} x {r['hidden']} | {r['ramps']} | {acc} | "
            f"{r['seconds_per_step']:.2f} | {r.get('precision') or '-'} | "
            f"{_pct(r.get('layer_compute_saved'))} / {_pct(r.get('layer_compute_saved_actual'))} | {claim} | "
            f"{certified} | {_pct(r.get('true_agreement'))} ({r.get('disagreements')} disagreements) | {holds} |")


def format_table(results: list[dict]) -> str:
    return "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in results])
