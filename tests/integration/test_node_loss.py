"""A node lost mid-job on a real multi-node Ray started the way users start one (`ray start --head`, then
`ray start --address` for each other node, all on this machine), the job submitted with `offramp submit`.

The node killed hosts one of the two early-exit actors and the job's threshold controller: the job must finish,
every input id must be in the output exactly once, the summary must count the shards retried, and the
controller must come back on the surviving node from its checkpoint."""
import json
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.offline import attempts
from tests.raycluster import BIN, LocalCluster

ROWS, SHARD = 6000, 100


@pytest.fixture
def cluster():
    # Lost nodes are noticed in ~3 s instead of the default ~30 s (GCS health checks).
    c = LocalCluster(head_cpus=1,
                     system_config={"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"})
    try:
        yield c
    finally:
        c.shutdown()


def _cli(cluster, *args, timeout=120):
    out = subprocess.run([str(BIN / "offramp"), *args], env=cluster.env, capture_output=True, text=True,
                         timeout=timeout)
    return out


def test_a_node_lost_mid_job_loses_no_row_and_the_controller_restores(cluster, tiny_artifact, tmp_path):
    nodes = [cluster.add_node(num_cpus=1, resources='{"w": 1, "ctl": 1}') for _ in range(2)]
    texts = [f"review {i}: the film was {'great' if i % 3 else 'awful'} and " + "quite long " * (i % 40)
             for i in range(ROWS)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)], "text": texts}), tmp_path / "in.parquet")
    cfg = {"name": "node-loss", "model": tiny_artifact,
           "input": {"url": str(tmp_path / "in.parquet"), "id_column": "id", "rows_per_shard": SHARD},
           "output": {"url": str(tmp_path / "out")},
           "actors": {"min_actors": 2, "max_actors": 2, "num_cpus": 0.5, "resources": {"w": 1},
                      "tokenize_cpus": 0.25, "wait_for_actors_s": 120},
           "controller": {"checkpoint_url": str(tmp_path / "controller.json"), "resources": {"ctl": 0.01},
                          "tuning": {"window_rows": 32}},
           # one-row micro-batches: the tiny model works as slowly as a real one, so the job outlasts the kill
           "engine": {"shadow_fraction": 0.25, "max_batch_rows": 1},
           "certify": {"enabled": False}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    sub = _cli(cluster, "submit", str(tmp_path / "job.yaml"), "--address", cluster.dashboard_url)
    assert sub.returncode == 0, sub.stderr[-3000:]
    job_id = sub.stdout.split()[0]

    # Find the node that hosts the controller (it also hosts one of the two early-exit actors: one per node with
    # "w"), then wait until the job is under way (parts written, a checkpoint saved) and kill that node whole.
    deadline, victim = time.monotonic() + 480, None
    while victim is None and time.monotonic() < deadline:
        alive = cluster.actors()
        ctl = [a for a in alive if a["class_name"] == "ThresholdController"]
        workers = [a for a in alive if "EarlyExitWorker" in a["class_name"]]
        if ctl and len(workers) == 2:
            victim = ctl[0]["node_id"]
            assert victim in {w["node_id"] for w in workers}
        time.sleep(0.5)
    assert victim is not None, "the controller and two actors never ran together"
    while time.monotonic() < deadline:
        parts = list((tmp_path / "out").glob("part-*.parquet"))
        if len(parts) >= 2 and (tmp_path / "controller.json").exists():
            break
        time.sleep(0.1)
    node_ids = _node_ids(cluster)
    doomed = nodes[node_ids.index(victim)]
    actor = next(w["pid"] for w in workers if w["node_id"] == victim)
    _kill_holding_a_shard(doomed, actor, tmp_path / "out", deadline)
    done_before = len(list((tmp_path / "out").glob("part-*.parquet")))

    st = _cli(cluster, "status", job_id, "--address", cluster.dashboard_url)
    deadline = time.monotonic() + 420
    while st.stdout.strip() not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(2)
        st = _cli(cluster, "status", job_id, "--address", cluster.dashboard_url)
    logs = _cli(cluster, "status", job_id, "--address", cluster.dashboard_url, "--logs").stdout
    assert st.stdout.strip() == "SUCCEEDED", logs[-4000:]

    ids = pq.read_table(tmp_path / "out", columns=["id"]).column("id").to_pylist()
    assert len(ids) == ROWS and set(ids) == {f"r{i}" for i in range(ROWS)}  # every row, exactly once
    summary = json.loads((tmp_path / "out" / "_offramp_summary.json").read_text())
    assert done_before < ROWS // SHARD and summary["shards"] == ROWS // SHARD
    print(f"shards retried: {summary['shards_retried']}, parts before the kill: {done_before}")
    assert summary["shards_retried"] >= 1  # the lost actor's shard ran again on the surviving one
    assert summary["controller"]["restores"] >= 1  # back on the surviving node, from its checkpoint
    assert summary["errors"] == 0


def _in_flight(out) -> set[str]:
    """Shard pieces an actor holds now: each attempt leaves a marker when it starts (pipeline.offline.attempts), its
    part appears whole when it ends, and an actor works on one at a time."""
    marked = {p.name.rsplit("-", 1)[0] for p in (out / attempts.DIR).glob("*-*-*")}
    return marked - {p.name[len("part-"):-len(".parquet")] for p in out.glob("part-*.parquet")}


def _kill_holding_a_shard(node, actor_pid: int, out, deadline: float) -> None:
    """Kill `node` while its actor holds a shard, so that shard must be retried: stop the actor (SIGSTOP) where it
    is, and kill the node once two pieces are in flight at once, one for each of the two actors, so one is the
    stopped actor's; if it stopped between shards, let it go on (SIGCONT) and stop it again a moment later."""
    tries = 0
    while time.monotonic() < deadline:
        os.kill(actor_pid, signal.SIGSTOP)
        tries += 1
        held = time.monotonic() + 3  # the other actor starts a shard every ~2 s
        while time.monotonic() < held:
            if len(in_flight := _in_flight(out)) >= 2:
                node.kill()  # the stopped actor too: every process of the node
                print(f"node killed with shard pieces {sorted(in_flight)} in flight (actor stopped {tries} time(s))")
                return
            time.sleep(0.05)
        os.kill(actor_pid, signal.SIGCONT)
        time.sleep(0.2)
    raise AssertionError("the victim's actor never held a shard while the other one held another")


def _node_ids(cluster) -> list[str]:
    """Node ids of the worker nodes, in the order they were added."""
    nodes = [n for n in cluster.nodes() if not n.get("is_head_node")]
    return [n["node_id"] for n in sorted(nodes, key=lambda n: n.get("start_time_ms") or 0)]
