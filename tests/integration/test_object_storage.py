"""Offline jobs whose model, corpus, output and controller checkpoint all live on S3: a real S3 API (moto's
server on 127.0.0.1), reached through s3fs with the endpoint in the job YAML or the environment, as a user
points offramp at MinIO. The jobs run as users run them: `offramp run job.yaml` in its own process, with its
own embedded Ray, killed mid-job and resumed."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.s3server import NO_METADATA, clean_aws_env

ROWS, FILES, PER_SHARD = 1200, 3, 50


def _env(tmp_path: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "OFFRAMP_CACHE_DIR": str(tmp_path / "node-cache"), "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_CONFIG_FILE": os.devnull, **NO_METADATA, **(extra or {})})
    return env


def _job(tmp_path: Path, name: str, urls: dict, storage: dict | None, slow: bool = False) -> Path:
    cfg = {
        "name": "s3-job",
        "model": urls["model"],
        "input": {"url": urls["input"], "text_column": "text", "id_column": "rid", "rows_per_shard": PER_SHARD},
        "output": {"url": urls["output"]},
        "controller": {"checkpoint_url": urls["checkpoint"], "tuning": {"window_rows": 64}},
        # slow: one-row micro-batches make the tiny model take seconds, long enough to be killed mid-job
        "engine": {"max_batch_rows": 1 if slow else 256, "shadow_fraction": 0.25},
        "actors": {"min_actors": 2, "max_actors": 2, "num_cpus": 0.5, "tokenize_cpus": 0.25, "wait_for_actors_s": 180},
        "certify": {"enabled": False},
        "local_ray": {"num_cpus": 2, "object_store_memory": 100_000_000},
    }
    if storage:
        cfg["storage"] = storage
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _offramp(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "-v", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Every process under `pid` (the embedded Ray the command started), read from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command and, by PID, every process it started."""
    tree = _descendants(proc.pid)
    proc.kill()
    proc.wait()
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parts(fs, output: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(p for p in fs.find(output) if p.rsplit("/", 1)[-1].startswith("part-"))


@pytest.fixture
def s3_job(s3_server, tiny_artifact, tmp_path, monkeypatch):
    """Model, corpus, output and checkpoint URLs on fresh buckets of the server; the model uploaded the way
    a user uploads an artifact directory."""
    clean_aws_env(monkeypatch)
    run = uuid.uuid4().hex[:6]
    models, corpus, results = (s3_server.bucket(f"{b}-{run}") for b in ("models", "corpus", "results"))
    fs = s3_server.fs()
    fs.put(tiny_artifact, f"{models}/tiny-ee", recursive=True)
    texts = [f"review {i}: {'a great film' if i % 3 else 'dull and long'}" for i in range(ROWS)]
    per = ROWS // FILES
    for f in range(FILES):
        with fs.open(f"{corpus}/in/part-{f}.parquet", "wb") as out:
            pq.write_table(pa.table({"rid": [f"r{i}" for i in range(f * per, (f + 1) * per)],
                                     "text": texts[f * per:(f + 1) * per]}), out)
    return {"model": f"{models}/tiny-ee", "input": f"{corpus}/in/*.parquet", "output": f"{results}/job",
            "checkpoint": f"{results}/controller/checkpoint.json"}


def test_s3_job_killed_mid_way_then_resumed_writes_every_row_once(s3_server, s3_job, tmp_path):
    fs = s3_server.fs()
    shards = ROWS // PER_SHARD
    # 1) endpoint and credentials in the YAML's storage block; the command is killed once a few parts are in
    first = _offramp(["run", str(_job(tmp_path, "job.yaml", s3_job, s3_server.storage(), slow=True))], _env(tmp_path))
    deadline = time.monotonic() + 300
    try:
        while len(_parts(fs, s3_job["output"])) < 3:
            assert first.poll() is None, f"the job ended before it could be killed: {first.communicate()}"
            assert time.monotonic() < deadline, "no parts appeared on S3 within 300 s"
            time.sleep(0.2)  # polling S3 for the job's progress
    finally:
        _kill_tree(first)
    done = _parts(fs, s3_job["output"])
    assert 3 <= len(done) < shards and not fs.exists(f"{s3_job['output']}/_offramp_summary.json")
    # What a writer killed mid-part leaves (a temporary key), and a part a careless tool cut short under its
    # final name: neither may be taken for a finished shard.
    whole = fs.cat(done[0])
    fs.pipe(f"{s3_job['output']}/_tmp-deadbeef-part-000999-000000.parquet", whole[: len(whole) // 2])
    fs.pipe(done[1], whole[: len(whole) // 2])

    # A copy the server was finishing as the command died can land after the listing above: count again.
    before = _parts(fs, s3_job["output"])

    # 2) --resume, this time with the endpoint and credentials in the environment (no storage block)
    t = time.monotonic()
    second = _offramp(["run", str(_job(tmp_path, "job-env.yaml", s3_job, None)), "--resume"],
                      _env(tmp_path, s3_server.env()))
    try:
        out, err = second.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_tree(second)
        out, err = second.communicate()
        pytest.fail(f"--resume did not finish in 300 s: {err[-5000:]}")
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out)
    assert summary["shards_resumed"] == len(before) - 1  # all but the cut one; the temporary key is no part
    assert summary["rows"] == ROWS - summary["shards_resumed"] * PER_SHARD
    fs.invalidate_cache()
    with fs.open(done[1], "rb") as f:  # the cut part's shard was redone, whole
        assert pq.ParquetFile(f).metadata.num_rows == PER_SHARD
    ids = []
    for p in _parts(fs, s3_job["output"]):
        with fs.open(p, "rb") as f:
            ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(ROWS))  # every row exactly once
    assert not [p for p in fs.find(s3_job["output"]) if "/_tmp-" in p]
    assert json.loads(fs.cat(f"{s3_job['output']}/_offramp_summary.json"))["rows_total"] == ROWS
    checkpoint = json.loads(fs.cat(s3_job["checkpoint"]))
    assert checkpoint["state"]["windows"] >= 1
    # both runs used one node-local copy of the model, fetched once
    cached = [p for p in (tmp_path / "node-cache" / "artifacts").iterdir() if not p.name.endswith(".lock")]
    assert len(cached) == 1 and (cached[0] / "manifest.json").exists()
    print(f"killed after {len(done)} of {shards} parts; --resume kept {summary['shards_resumed']} and wrote "
          f"{summary['rows']} rows in {time.monotonic() - t:.1f} s")


def test_wrong_bucket_and_missing_credentials_fail_up_front_in_the_driver(s3_server, s3_job, tmp_path):
    from pipeline.config import JobConfig
    from pipeline.data import storage
    from pipeline.offline.job import JobError, run_job

    def cfg(storage_block, **urls):
        data = yaml.safe_load(_job(tmp_path, "j.yaml", {**s3_job, **urls}, storage_block).read_text())
        return JobConfig.model_validate(data)

    good = s3_server.storage()
    try:
        # (no Ray is started: each fails in the driver's checks, in well under a second per URL)
        with pytest.raises(JobError, match=r"model 's3://no-such-models/tiny-ee': bucket 'no-such-models' does not"):
            run_job(cfg(good, model="s3://no-such-models/tiny-ee"))
        with pytest.raises(JobError, match=r"input 's3://no-such-corpus/in/\*.parquet': bucket 'no-such-corpus'"):
            run_job(cfg(good, input="s3://no-such-corpus/in/*.parquet"))
        with pytest.raises(JobError, match=r"output 's3://no-such-results/job': bucket 'no-such-results'"):
            run_job(cfg(good, output="s3://no-such-results/job"))
        with pytest.raises(JobError, match=r"checkpoint_url 's3://no-such-ckpt': bucket 'no-such-ckpt'"):
            run_job(cfg(good, checkpoint="s3://no-such-ckpt/c.json"))
        with pytest.raises(JobError, match=r"model 's3://.*no credentials for s3://.*AWS_ACCESS_KEY_ID"):
            run_job(cfg({"s3": {"endpoint_url": s3_server.endpoint}}))
        with pytest.raises(JobError, match=r"not an early-exit artifact"):
            run_job(cfg(good, model=s3_job["model"].rsplit("/", 1)[0] + "/no-model-here"))
    finally:
        storage.configure(None)


def test_model_commands_read_and_write_models_at_s3_urls(s3_server, tiny_model_dir, tmp_path, monkeypatch):
    """`offramp bootstrap --model s3://... --out s3://...`, then `inspect` and `predict` on the URL, with the
    endpoint and credentials exported as for MinIO. No Ray."""
    clean_aws_env(monkeypatch)
    fs = s3_server.fs()
    bucket = s3_server.bucket(f"models-{uuid.uuid4().hex[:6]}")
    fs.put(tiny_model_dir, f"{bucket}/classifier", recursive=True)
    env = _env(tmp_path, s3_server.env())

    def offramp(*args):
        p = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        return p.stdout

    shown = offramp("bootstrap", "--model", f"{bucket}/classifier", "--out", f"{bucket}/ee", "--limit", "120",
                    "--epochs", "2")
    assert f"{bucket}/ee: bert, 4 layers" in shown
    keys = [p.rsplit("/ee/", 1)[1] for p in fs.find(f"{bucket}/ee")]
    assert {"manifest.json", "ramps.safetensors", "model/model.safetensors"} <= set(keys)
    assert not [k for k in keys if "_tmp-" in k or "offramp-cache" in k]
    assert offramp("inspect", f"{bucket}/ee").splitlines()[0] == shown.splitlines()[0]
    out = [json.loads(line) for line in offramp("predict", "--model", f"{bucket}/ee", "--json", "a fine film",
                                                 "dull").splitlines()]
    assert [o["text"] for o in out] == ["a fine film", "dull"] and all(o["label"] for o in out)
    with pytest.raises(AssertionError, match="bucket 'no-such-bucket' does not exist"):
        offramp("bootstrap", "--model", f"{bucket}/classifier", "--out", "s3://no-such-bucket/ee", "--limit", "10")
