"""The CLI end to end, as a user runs it (subprocesses), on a tiny model."""
import json

import pytest

from tests.e2e.cli import offramp


@pytest.fixture(scope="module")
def ee_dir(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("cli")
    ft = base / "ft"
    out = offramp("finetune", "--base", tiny_model_dir, "--dataset", "movie-reviews", "--out", ft,
                  "--max-steps", "3", "--limit", "96", "--batch-size", "16")
    report = json.loads(out.stdout)
    assert report["steps"] == 3 and 0 <= report["test_accuracy"] <= 1
    assert (ft / "model.safetensors").exists() and (ft / "eval.json").exists()
    ee = base / "ee"
    out = offramp("bootstrap", "--model", ft, "--data", "movie-reviews", "--out", ee, "--limit", "200", "--epochs", "3")
    assert "val agree" in out.stdout and (ee / "ramps.safetensors").exists()
    return ee


def test_predict_texts_and_file(ee_dir, tmp_path):
    out = offramp("predict", "--model", ee_dir, "--json", "a wonderful film", "a dreadful film")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a wonderful film", "a dreadful film"]
    assert all(r["label"] in ("negative", "positive") and 1 <= r["exit_layer"] <= 4 for r in rows)
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "good"}\n{"text": ""}\n{"text": "bad"}\n')
    out = offramp("predict", "--model", ee_dir, "--input", data, "--json", check=False)
    assert out.returncode == 2  # a row had an error: reported, not dropped
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 3 and rows[1]["error"] and not rows[0]["error"]


def test_inspect_shows_every_ramp(ee_dir):
    out = offramp("inspect", ee_dir).stdout
    for layer in (1, 2, 3):
        assert f"     {layer}  mean" in out
    assert "agreement" in out


def test_errors_are_clear_and_nonzero(tmp_path):
    out = offramp("bootstrap", "--model", "minilm-l6", "--out", tmp_path / "x", check=False)
    assert out.returncode != 0 and "no classification head" in out.stderr
    out = offramp("predict", "--model", tmp_path, "hi", check=False)
    assert out.returncode != 0 and "offramp bootstrap" in out.stderr
    out = offramp("finetune", "--dataset", "nope", "--out", tmp_path / "y", check=False)
    assert out.returncode != 0 and "built-in" in out.stderr
