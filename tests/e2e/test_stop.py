"""A stopped command leaves nothing running that it started: `offramp serve` (serving) and `offramp run` (mid-job),
each with its embedded Ray, get SIGTERM (a service manager, `kill`) or SIGINT (Ctrl-C), and every process of their
Ray is gone within seconds.

Each command runs as a user starts it, a subprocess in a session of its own, with a Ray temp dir of its own
(RAY_TMPDIR): every process of its Ray inherits that variable, so the test tells them from any other Ray on the
machine, including ones that left the command's process tree (orphans). Serve's start-up (~20 s here) dominates."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401 - psutil ships inside Ray (ray/thirdparty_files) and is importable after it
import requests
import yaml

import psutil  # isort: skip
from tests.raycluster import free_port

ROOT = Path(__file__).resolve().parents[2]
GONE_S = 10.0  # after the command exits, the longest any process of its Ray may take to be gone


class Command:
    """`offramp ARGS` started the way a user's shell starts it, with stdout and stderr in files under `tmp`."""

    def __init__(self, args: list[str], tmp: Path):
        self.ray_tmp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # unix socket paths under it must stay short
        env = {**os.environ, "RAY_TMPDIR": self.ray_tmp, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1"}
        self.stdout, self.stderr = tmp / "stdout.txt", tmp / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env,
                                         stdout=out, stderr=err, start_new_session=True)

    def output(self) -> str:
        return self.stdout.read_text() + self.stderr.read_text()

    def wait_for(self, ready, what: str, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"offramp exited ({self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout_s:.0f} s:\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def ray_processes(self) -> list[psutil.Process]:
        """Every live process of this command's Ray (other than the command): they all inherit RAY_TMPDIR."""
        out = []
        for p in psutil.process_iter():
            try:
                if p.pid != self.proc.pid and p.environ().get("RAY_TMPDIR") == self.ray_tmp and _running(p):
                    out.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return out

    def stop_with(self, sig: int) -> tuple[int, float, list[str]]:
        """Send `sig` to the command alone; (exit status, seconds to exit, processes of its Ray left GONE_S after)."""
        tree = [p for p in psutil.Process(self.proc.pid).children(recursive=True)]
        ours = {p.pid: p for p in tree + self.ray_processes()}
        names = set()
        for p in ours.values():
            try:
                names.add(p.name())
            except psutil.NoSuchProcess:
                pass
        assert {"raylet", "gcs_server"} <= names, f"not the command's Ray: {names}"
        t = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        exit_s = time.monotonic() - t
        deadline = time.monotonic() + GONE_S
        while True:
            left = {p.pid: p for p in list(ours.values()) + self.ray_processes() if _running(p)}
            if not left or time.monotonic() > deadline:
                return code, exit_s, [f"{pid} {_name(p)}" for pid, p in left.items()]
            time.sleep(0.2)

    def close(self) -> None:
        """Whatever happened, leave nothing running either."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for p in self.ray_processes():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie only waits to be reaped
    except psutil.NoSuchProcess:
        return False


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:60].strip() or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stopped_by_a_signal_leaves_no_process(sig, tiny_artifact, tmp_path):
    port = free_port()
    config = {"http_options": {"port": port},
              "applications": [{"name": "stop", "route_prefix": "/", "import_path": "pipeline.serving.app:app_builder",
                                "args": {"model": tiny_artifact, "engine": {"num_threads": 1}},  # its own controller
                                "deployments": [{"name": "EarlyExitDeployment", "num_replicas": 1,
                                                 "ray_actor_options": {"num_cpus": 0.5}}]}]}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    cmd = Command(["serve", str(tmp_path / "serve.yaml")], tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        cmd.wait_for(lambda: "Ctrl-C to stop" in cmd.output() and _ok(f"{url}/health"), "healthy endpoint")
        assert any("ThresholdController" in _name(p) for p in cmd.ray_processes())  # the app's own controller
        code, exit_s, left = cmd.stop_with(sig)
        assert not left, f"left running {GONE_S:.0f} s after offramp serve exited ({exit_s:.1f} s after {sig!r}): {left}"
        assert code == 0, f"exit status {code}:\n{cmd.output()[-3000:]}"
        assert "shutting down" in cmd.output()
        assert not _ok(f"{url}/health")
    finally:
        cmd.close()


def test_run_stopped_mid_job_leaves_no_process_and_resumes(tiny_artifact, tmp_path):
    rows, shard = 1000, 50
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)],
                             "text": [f"review {i}: the film was {'great' if i % 3 else 'awful'}" for i in range(rows)]}),
                   tmp_path / "in.parquet")
    out = tmp_path / "out"
    job = {"name": "stop", "model": tiny_artifact,
           "input": {"url": str(tmp_path / "in.parquet"), "id_column": "id", "rows_per_shard": shard},
           "output": {"url": str(out)}, "actors": {"min_actors": 1, "max_actors": 1, "num_cpus": 0.5},
           "local_ray": {"num_cpus": 2}, "certify": {"enabled": False},
           "engine": {"max_batch_rows": 1}}  # one-row micro-batches: ~0.5 s a shard, so the job outlasts the signal
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    cmd = Command(["run", str(tmp_path / "job.yaml")], tmp_path)
    try:
        cmd.wait_for(lambda: any(out.glob("part-*.parquet")), "part written")
        code, exit_s, left = cmd.stop_with(signal.SIGTERM)
        assert not left, f"left running {GONE_S:.0f} s after offramp run exited ({exit_s:.1f} s after SIGTERM): {left}"
    finally:
        cmd.close()
    assert code == 128 + signal.SIGTERM, cmd.output()[-3000:]
    assert "--resume" in cmd.stderr.read_text()
    done = len(list(out.glob("part-*.parquet")))
    assert 0 < done < rows // shard and not (out / "_offramp_summary.json").exists()  # stopped mid-job

    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "job.yaml"), "--resume"],
                             cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({done} already finished, resuming)" in resumed.stderr
    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert sorted(ids) == sorted(f"r{i}" for i in range(rows))  # every row, exactly once
    assert json.loads((out / "_offramp_summary.json").read_text())["shards"] == rows // shard


def _ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
