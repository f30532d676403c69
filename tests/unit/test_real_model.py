"""The packaged MiniLM-L6, briefly fine-tuned on real movie reviews (cached between runs)."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import BootstrapConfig, EngineConfig, FinetuneConfig
from pipeline.data.datasets import load_dataset
from pipeline.engine.executor import execute
from pipeline.engine.loader import load_artifact
from pipeline.engine.policy import ExitPolicy
from pipeline.engine.predictor import Predictor
from pipeline.model.artifact import load_classifier

pytestmark = pytest.mark.real_model
CACHE = Path(os.environ.get("OFFRAMP_TEST_CACHE", Path.home() / ".cache" / "offramp-tests")) / "minilm-movie-v1"


@pytest.fixture(scope="module")
def real_ee():
    """Built once, then reused: under a file lock (parallel pytest runs) and moved into place whole."""
    import fcntl
    import shutil
    import tempfile

    from pipeline.training.bootstrap import bootstrap
    from pipeline.training.finetune import finetune

    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (CACHE / "ee" / "manifest.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=CACHE.parent))
            finetune(str(tmp / "model"), FinetuneConfig(max_steps=60, batch_size=16, limit=960, learning_rate=1e-4))
            bootstrap(str(tmp / "model"), str(tmp / "ee"), BootstrapConfig(limit=900, epochs=15))
            shutil.rmtree(CACHE, ignore_errors=True)
            tmp.rename(CACHE)
    return str(CACHE / "model"), str(CACHE / "ee")


def test_finetuned_minilm_is_a_real_classifier(real_ee):
    import json

    report = json.loads(Path(real_ee[0], "eval.json").read_text())
    assert report["steps"] == 60
    assert report["test_accuracy"] > 0.6  # far above chance on held-out sentences after 60 steps


def test_ramps_off_equals_the_original_minilm(real_ee):
    model_dir, ee_dir = real_ee
    model, tok, manifest = load_artifact(ee_dir)
    assert manifest.num_layers == 6 and manifest.hidden_size == 384 and manifest.ramp_layers == [1, 2, 3, 4, 5]
    original = load_classifier(model_dir)
    texts = load_dataset("movie-reviews").split("test").texts[:48]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        ref = torch.softmax(original(**enc).logits, -1)
    out = execute(model, enc["input_ids"], enc["attention_mask"], ExitPolicy.closed(5), "exit")
    assert torch.equal(out.label, ref.argmax(-1))
    torch.testing.assert_close(out.score, ref.max(-1).values, atol=1e-5, rtol=1e-5)


def test_ramps_learned_and_thresholds_hold_on_validation(real_ee):
    _, ee_dir = real_ee
    from pipeline.model.artifact import read_manifest

    m = read_manifest(ee_dir)
    agree = [r.val_agreement for r in m.ramps]
    assert agree[-1] > 0.85 and agree[-1] >= agree[0] - 0.05  # later ramps know more
    assert m.bootstrap["validation_agreement_at_thresholds"] >= 1 - m.constraint
    assert any(t < 1.0 for t in m.thresholds)  # something exits


def test_exit_mode_saves_layers_with_the_same_answers_as_release(real_ee):
    _, ee_dir = real_ee
    texts = load_dataset("movie-reviews").split("test").texts[:256]
    ex = Predictor(ee_dir, EngineConfig(mode="exit")).predict(texts)
    rel = Predictor(ee_dir, EngineConfig(mode="release")).predict(texts)
    assert [p.label for p in ex.predictions] == [p.label for p in rel.predictions]
    assert sum(ex.stats["layer_rows"]) < sum(rel.stats["layer_rows"])
    assert np.mean([p.exit_layer for p in ex.predictions]) < 6
