"""`offramp distill` / `offramp quantize` end to end (subprocesses) on tiny random models."""
import json
from pathlib import Path

import torch

from tests.e2e.cli import offramp


def _fragile_dir(path: Path) -> Path:
    """A tiny random classifier with its bias set so real text sits on the decision boundary."""
    from pipeline.model.artifact import load_classifier, load_tokenizer
    from pipeline.model.classify import classifier_logits
    from pipeline.training.compression_check import heldout_texts
    from tests.tiny import save_tiny

    save_tiny(path, "bert", num_layers=2)
    model, tok = load_classifier(str(path)), load_tokenizer(str(path))
    _, texts, _ = heldout_texts("movie-reviews", 100)
    margin = classifier_logits(model, tok, texts, 128) @ torch.tensor([-1.0, 1.0])
    with torch.no_grad():
        model.classifier.bias[1] -= float(margin.median())
    model.save_pretrained(path, safe_serialization=True)
    return path


def test_quantize_exits_nonzero_over_budget_and_writes_with_allow_loss(tmp_path):
    src, out = _fragile_dir(tmp_path / "fragile"), tmp_path / "bf16"
    proc = offramp("quantize", "--model", src, "--method", "bf16", "--out", out, "--limit", "100",
                   "--budget", "0", check=False)
    assert proc.returncode != 0 and "over the budget" in proc.stderr and "--allow-loss" in proc.stderr
    assert json.loads(proc.stdout)["agreement"] < 1.0 and not out.exists()
    proc = offramp("quantize", "--model", src, "--method", "bf16", "--out", out, "--limit", "100",
                   "--budget", "0", "--allow-loss")
    rec = json.loads((out / "compression.json").read_text())
    assert rec["method"] == "bf16" and rec["check"] == json.loads(proc.stdout)
    assert "agreement" in proc.stderr and (out / "model.safetensors").exists()


def test_distill_bootstrap_quantize_predict(tmp_path, tiny_model_dir):
    student, ee, q = tmp_path / "student", tmp_path / "ee", tmp_path / "ee-int8"
    proc = offramp("distill", "--teacher", tiny_model_dir, "--keep-layers", "0,2", "--data", "movie-reviews",
                   "--out", student, "--max-steps", "2", "--limit", "48", "--eval-limit", "30")
    report = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert report["keep_layers"] == [0, 2] and "DISTILLED 4 -> 2 layers" in proc.stderr
    offramp("bootstrap", "--model", student, "--out", ee, "--limit", "100", "--epochs", "2")
    offramp("quantize", "--model", ee, "--method", "int8-dynamic", "--backend", "torch-ao", "--out", q,
            "--limit", "30", "--allow-loss")
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["num_layers"] == 2 and manifest["compression"]["method"] == "int8-dynamic"
    assert manifest["compression"]["check"]["rows"] == 30 and "exit_agreement" in manifest["compression"]["check"]
    rows = [json.loads(x) for x in offramp("predict", "--model", q, "--json", "a fine film").stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["label"] in ("class0", "class1") and not rows[0]["error"]
