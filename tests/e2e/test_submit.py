"""`offramp submit` through the Ray Jobs API against a local `ray start --head` (with its dashboard)."""
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.raycluster import BIN, LocalCluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_head():
    cluster = LocalCluster(head_cpus=2)
    try:
        yield cluster.dashboard_url, cluster.env
    finally:
        cluster.shutdown()


def test_submit_runs_the_job_on_the_cluster(ray_head, tiny_artifact, tmp_path):
    address, env = ray_head
    pq.write_table(pa.table({"text": [f"movie {i} was {'great' if i % 2 else 'awful'}" for i in range(200)]}),
                   tmp_path / "in.parquet")
    cfg = {"model": tiny_artifact, "input": {"url": str(tmp_path / "in.parquet"), "rows_per_shard": 50},
           "output": {"url": str(tmp_path / "out")}, "controller": {"enabled": False},
           "actors": {"max_actors": 1, "num_cpus": 0.5}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([str(BIN / "offramp"), "submit", str(tmp_path / "job.yaml"), "--address", address, "--wait"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    job_id, status_line = proc.stdout.split()[0], proc.stdout.split()[-1]
    assert status_line == "SUCCEEDED"
    summary = json.loads((tmp_path / "out" / "_offramp_summary.json").read_text())
    assert summary["rows"] == 200 and summary["errors"] == 0
    assert len(pq.read_table(tmp_path / "out").column("id")) == 200
    st = subprocess.run([str(BIN / "offramp"), "status", job_id, "--address", address], env=env, capture_output=True,
                        text=True, timeout=60)
    assert st.stdout.strip() == "SUCCEEDED"
