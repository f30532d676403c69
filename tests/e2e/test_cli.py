"""The CLI end to end, as a user runs it (subprocesses), on a tiny model."""
import json

import pytest

from tests.claims import holds
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


def _job_yaml(tmp_path, ee_dir, rows, **certify):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.datasets import load_dataset

    ds = load_dataset("movie-reviews").sample(rows, seed=1)
    pq.write_table(pa.table({"id": ds.ids, "text": ds.texts}), tmp_path / "in.parquet")
    lines = [f"model: {ee_dir}", f"input: {{url: {tmp_path / 'in.parquet'}, id_column: id, rows_per_shard: 100}}",
             f"output: {{url: {tmp_path / 'out'}}}", "controller: {enabled: false}",
             "actors: {min_actors: 1, max_actors: 1, num_cpus: 0.5}", "local_ray: {num_cpus: 2}",
             "engine: {thresholds: [0.0, 1.0, 1.0]}",
             "certify: {" + ", ".join(f"{k}: {v}" for k, v in certify.items()) + "}"]
    (tmp_path / "job.yaml").write_text("\n".join(lines) + "\n")
    return tmp_path / "job.yaml"


def test_an_uncertified_job_exits_3_names_the_fix_and_verify_audits_it(ee_dir, tmp_path):
    """Ramps opened by hand, no calibration, a tiny audit: the certificate falls short, the job says so and
    exits 3 (0 with --allow-uncertified); `offramp verify` runs the original model over every row and the
    claimed interval contains the true agreement."""
    job = _job_yaml(tmp_path, ee_dir, 400, calibrate="false", audit_fraction=0.05, top_up="false")
    out = offramp("run", job, check=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "NOT certified" in out.stderr and "--repair" in out.stderr
    # no calibration here; on a CPU with fast bfloat16 the float original also ran beside the model
    assert "the promise cost: " in out.stderr and "audit and feedback rows run to the end" in out.stderr
    summary = json.loads(out.stdout)
    assert summary["certificate"]["certified"] is False and summary["rows"] == 400
    again = offramp("run", job, "--output", tmp_path / "out2", "--allow-uncertified", check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    report = offramp("verify", tmp_path / "out", "--json", tmp_path / "verify.json")
    assert "true agreement with the original model" in report.stdout
    assert "the claimed interval contains the truth: " in report.stdout
    checked = json.loads((tmp_path / "verify.json").read_text())
    assert holds(summary["certificate"], checked["agreement"])
    assert checked["rows_checked"] == 400 and checked["per_exit_layer"]
    sample = offramp("verify", tmp_path / "out", "--sample", "100").stdout
    assert "Clopper-Pearson 95%, 100 rows" in sample
