"""`offramp submit` through the Ray Jobs API against a local `ray start --head` (with its dashboard)."""
import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # unix socket paths must stay short
    port, dash, agent = _free_port(), _free_port(), _free_port()
    # Ray >= 2.59 authenticates local clusters with a token: share one explicitly with the client.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # the cluster's `python` has offramp installed
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp}",
             f"--dashboard-agent-listen-port={agent}",  # not the default 52365 another Ray may hold
             "--object-store-memory=100000000", "--disable-usage-stats"]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                       capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


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
