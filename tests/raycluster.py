"""Real Ray nodes for tests, started the way users start them (`ray start --head`, `ray start --address`), each in
its own process group so a test stops (or kills, to simulate a lost node) exactly the processes it started, never
another user's Ray (`ray stop` stops every Ray on the machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """One `ray start --block` process (and everything it starts, in its process group)."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                                     start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def kill(self) -> None:
        """SIGKILL the whole node at once: what a lost machine looks like to the rest of the cluster. Every process
        of its session: its workers each run in a process group of their own (a stopped one would never notice its
        raylet is gone)."""
        self._signal(signal.SIGKILL)
        for pid in self.session_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)

    def session_pids(self) -> list[int]:
        """Every live process of this node: `ray start` leads a session of its own, which all it starts stay in."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == self.proc.pid:
                        pids.append(int(entry))
                except OSError:  # gone meanwhile
                    pass
        return pids

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # anything left in the group (task workers exit with their raylet)

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass


class LocalCluster:
    """A head node (with its dashboard on 127.0.0.1: the Jobs and state APIs) plus worker nodes joined to it, on
    this machine, with their own temp dir, ports and auth token. `env` is what clients (`offramp submit`, the
    `ray` CLI) need."""

    def __init__(self, head_cpus: int = 2, system_config: dict[str, str] | None = None,
                 head_resources: str | None = None):
        self.temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # unix socket paths must stay short
        self.port, self.dashboard_port = free_port(), free_port()
        # Ray >= 2.59 authenticates local clusters with a token: share one explicitly with the clients.
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}",  # the cluster's `python` has offramp installed
                    **(system_config or {})}
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        args = ["--head", f"--port={self.port}", f"--num-cpus={head_cpus}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={self.temp}", "--object-store-memory=100000000", *self._ports(),
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={free_port()}"]  # not the default 52365 another Ray may hold
        if head_resources:
            args.append(f"--resources={head_resources}")
        self.head = RayNode(args, self.env)
        self.workers: list[RayNode] = []
        try:
            self._wait_for_nodes(1)
        except BaseException:
            self.shutdown()
            raise

    @staticmethod
    def _ports() -> list[str]:
        return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]

    def add_node(self, num_cpus: int = 1, resources: str | None = None) -> RayNode:
        # A temp dir of its own, as a separate machine has: nodes sharing one would unpack a job's working_dir
        # into the same folder, each deleting the other's files mid-import.
        temp = tempfile.mkdtemp(prefix="rn", dir=self.temp)
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1",
                f"--temp-dir={temp}", "--object-store-memory=100000000", *self._ports()]
        if resources:
            args.append(f"--resources={resources}")
        node = RayNode(args, self.env)
        self.workers.append(node)
        try:
            self._wait_for_nodes(1 + len(self.workers))
        except BaseException:
            self.shutdown()
            raise
        return node

    def nodes(self) -> list[dict]:
        """The cluster's nodes (node_id, state, is_head_node, ...), from Ray's state API through the `ray` CLI: a
        subprocess with this cluster's token, so this process's own Ray (and its auth settings) stay untouched."""
        return self._state("nodes")

    def actors(self) -> list[dict]:
        """The cluster's live actors: class_name, node_id, pid, ..."""
        return self._state("actors", "--filter", "state=ALIVE", "--limit", "1000")

    def _state(self, what: str, *args: str) -> list[dict]:
        out = subprocess.run([str(BIN / "ray"), "list", what, "--address", self.dashboard_url, "--format", "json",
                              "--detail", *args], env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-500:])
        text = out.stdout.strip()
        return json.loads(text) if text.startswith("[") else []  # "No resource in the cluster" when empty

    def _wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline, why = time.monotonic() + timeout, "no answer yet"
        while time.monotonic() < deadline:
            dead = [nd for nd in [self.head, *self.workers] if nd.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"ray start exited: {dead[0].proc.stderr.read().decode()[-3000:]}")
            try:
                if sum(nd["state"] == "ALIVE" for nd in self.nodes()) >= n:
                    return
            except Exception as e:  # noqa: BLE001 - the dashboard is not up yet
                why = repr(e)[:300]
            time.sleep(0.5)
        raise TimeoutError(f"{n} Ray node(s) did not come up in {timeout:.0f} s (last: {why})")

    def shutdown(self) -> None:
        for node in [*self.workers, self.head]:
            node.stop()
        shutil.rmtree(self.temp, ignore_errors=True)
