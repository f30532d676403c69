"""Scale-out on a real multi-node Ray: num_gpus=1 actors land one per GPU node; too many fail fast."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_actors_spread_one_per_node_and_oversubscription_fails_clearly(tiny_artifact, tmp_path):
    # Its own process: a driver can join one Ray at a time and the session Ray is already up.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/integration/multinode_job.py"), tiny_artifact,
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["rows"] == 1200
    assert len(result["nodes"]) == 2, f"expected one actor per GPU node, got {result['workers']}"
    assert result["error"] and "could not start 3 early-exit actor(s)" in result["error"]
    assert result["fail_s"] < 120  # bounded wait, not a hang
