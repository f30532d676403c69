"""Artifacts: safetensors + JSON round trip, clear errors for the usual mistakes, never pickle."""
import json
import shutil

import pytest
import torch

from pipeline.engine.executor import execute
from pipeline.engine.loader import load_artifact
from pipeline.engine.policy import ExitPolicy
from pipeline.model.artifact import load_classifier, read_manifest
from tests.tiny import save_tiny


def test_round_trip_reproduces_the_original_model(tiny_artifact, tiny_model_dir):
    model, tok, manifest = load_artifact(tiny_artifact)
    original = load_classifier(tiny_model_dir)
    enc = tok(["a movie", "another longer movie review here"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = original(**enc).logits.argmax(-1)
    out = execute(model, enc["input_ids"], enc["attention_mask"], ExitPolicy.closed(len(model.ramps)))
    assert torch.equal(out.label, ref)
    assert manifest.ramp_layers == [1, 2, 3]
    assert len(manifest.profile.layer_ms) == 4 and len(manifest.profile.ramp_ms) == 3
    assert all(0 <= r.val_agreement <= 1 for r in manifest.ramps)
    assert all(0 <= t <= 1 for t in manifest.thresholds)
    # initial thresholds meet the constraint on the validation split they were tuned on
    assert manifest.bootstrap["validation_agreement_at_thresholds"] >= 1 - manifest.constraint


def test_ramps_from_another_model_are_rejected(tiny_artifact, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact, other)
    shutil.rmtree(other / "model")
    save_tiny(other / "model", "bert", num_layers=2)  # 2 layers, ramps expect 4
    with pytest.raises(ValueError, match="another model"):
        load_artifact(other)


def test_ramps_file_not_matching_manifest_is_rejected(tiny_artifact, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_artifact, other)
    m = json.loads((other / "manifest.json").read_text())
    m["hidden_size"] = 64
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="ramps.safetensors does not match"):
        load_artifact(other)


def test_model_without_classification_head_is_rejected():
    with pytest.raises(ValueError, match="no classification head"):
        load_classifier("minilm-l6")  # the packaged MiniLM is a bare encoder


def test_pickled_weights_are_never_loaded(tmp_path):
    d = save_tiny(tmp_path / "m")
    model = load_classifier(d)
    (tmp_path / "m" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(Exception, match="safetensors|model.safetensors|does not appear"):
        load_classifier(d)


def test_not_an_artifact_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="offramp bootstrap"):
        read_manifest(tmp_path)


def test_the_float_original_of_a_derived_artifact_is_its_source(tiny_artifact, tmp_path):
    """A model derived from another (a pruned one) names its source in the manifest; agreement is measured
    against that source, and a copy whose manifest names none is its own original."""
    import shutil

    from pipeline.model.artifact import original_of, read_manifest, write_manifest

    derived = tmp_path / "derived"
    shutil.copytree(tiny_artifact, derived)
    assert original_of(str(derived)) == str(derived)
    m = read_manifest(derived)
    m.original = str(tiny_artifact)
    write_manifest(derived, m)
    assert original_of(str(derived)) == str(tiny_artifact)
    again = tmp_path / "again"  # relative names resolve against the artifact, and chains are followed
    shutil.copytree(derived, again)
    m.original = "../derived"
    write_manifest(again, m)
    assert original_of(str(again)) == str(tiny_artifact)
