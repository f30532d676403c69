"""A real S3 API for tests: moto's server in its own process on 127.0.0.1, on a free port.

offramp talks to it exactly as to MinIO or AWS: s3fs with an endpoint URL and credentials (moto accepts any).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

KEY, SECRET = "offramp-test", "offramp-test-secret"
# botocore, finding no credentials, would next ask the EC2 metadata address: never leave this machine
NO_METADATA = {"AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """`with S3Server() as s3:` -> s3.endpoint (http://127.0.0.1:PORT); stopped (by its PID) on exit."""

    def __init__(self, start_timeout_s: float = 60):
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        # its request log goes to a file: a pipe nobody reads fills up and stalls the server
        self.log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)

    def __enter__(self) -> "S3Server":
        for _ in range(5):  # the free port can be taken between choosing and binding it: choose again
            port = _free_port()
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         stdout=self.log, stderr=subprocess.STDOUT)
            self.endpoint = f"http://127.0.0.1:{port}"
            if self._wait_ready():
                return self
        raise RuntimeError(f"moto server did not start: {open(self.log.name).read()[-2000:]}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                    return True
            except OSError:
                time.sleep(0.05)  # polling the server's own readiness, not ordering work
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log.name)

    def env(self) -> dict[str, str]:
        """What a user exports to point offramp (s3fs) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", **NO_METADATA}

    def storage(self) -> dict:
        """The same as a job YAML's `storage:` block."""
        return {"s3": {"endpoint_url": self.endpoint, "key": KEY, "secret": SECRET, "region": "us-east-1"}}

    def fs(self):
        """An s3fs filesystem for the test's own setup and checks (not offramp's)."""
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY, secret=SECRET, skip_instance_cache=True)

    def bucket(self, name: str) -> str:
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"


def clean_aws_env(monkeypatch) -> None:
    """No AWS settings from the machine this runs on: the test sets what it means to."""
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k, raising=False)
    for k, v in NO_METADATA.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
