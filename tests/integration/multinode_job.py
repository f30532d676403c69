"""Run by test_multinode.py in its own process: a real multi-node Ray on this machine
(ray.cluster_utils.Cluster: head + 2 worker nodes, each declaring one logical GPU)."""
import json
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from pipeline.config import JobConfig
from pipeline.offline.job import JobError, run_job


def main(artifact: str, tmp: str) -> None:
    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    started = time.time() - t0
    pq.write_table(pa.table({"text": [f"sentence number {i} is {'good' if i % 2 else 'bad'}" for i in range(1200)]}),
                   f"{tmp}/in.parquet")
    base = {"model": artifact, "input": {"url": f"{tmp}/in.parquet", "rows_per_shard": 30},
            "output": {"url": f"{tmp}/out"}, "controller": {"enabled": False},
            "actors": {"min_actors": 2, "max_actors": 2, "num_gpus": 1, "num_cpus": 0.5, "wait_for_actors_s": 120}}
    t = time.time()
    summary = run_job(JobConfig.model_validate(base))
    job_s = time.time() - t
    nodes = {w.split(":")[0] for w in summary["rows_per_worker"]}
    too_many = dict(base, output={"url": f"{tmp}/out2"},
                    actors={**base["actors"], "min_actors": 3, "max_actors": 3, "wait_for_actors_s": 15})
    t = time.time()
    try:
        run_job(JobConfig.model_validate(too_many))
        error = None
    except JobError as e:
        error = str(e)
    fail_s = time.time() - t
    print(json.dumps({"rows": summary["rows"], "nodes": sorted(nodes), "workers": summary["rows_per_worker"],
                      "error": error, "cluster_start_s": started, "job_s": job_s, "fail_s": fail_s}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
