"""pipeline.offline.ray_session without Ray: ray.init and ray.shutdown stand-ins start and leave real processes (one
that ignores SIGTERM, with a child), as an embedded Ray's node can be left after ray.shutdown."""
import os
import signal
import subprocess
import sys
import time

import pytest
import ray

import psutil  # isort: skip - ships inside Ray (ray/thirdparty_files), importable after it
from pipeline.offline import ray_session

STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)")


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init starts a process that ignores SIGTERM (and a child of it); ray.shutdown leaves both running."""
    started = []

    def init(**kwargs):
        started.append(subprocess.Popen([sys.executable, "-c", STUBBORN]))
        time.sleep(0.5)  # its child is started

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    yield started
    for p in started:
        p.kill()
        p.wait()


def test_sigterm_interrupts_and_shutdown_ends_what_init_started(fake_ray):
    before = {s: signal.getsignal(s) for s in ray_session.SIGNALS}
    ray_session.init(num_cpus=1)
    node = psutil.Process(fake_ray[0].pid)
    family = [node, *node.children(recursive=True)]
    assert len(family) == 2
    with pytest.raises(KeyboardInterrupt) as caught:  # what code that stops on Ctrl-C already handles
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at the next bytecode
    assert isinstance(caught.value, ray_session.Interrupted) and caught.value.signum == signal.SIGTERM
    t = time.monotonic()
    ray_session.shutdown(grace_s=0.2)
    assert time.monotonic() - t < 5
    fake_ray[0].wait(timeout=5)  # SIGKILLed: it ignored SIGTERM
    assert not any(_running(p) for p in family)
    assert {s: signal.getsignal(s) for s in ray_session.SIGNALS} == before


def _running(p) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_shutdown_without_init_ends_nothing_and_keeps_the_handlers(monkeypatch):
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    before = {s: signal.getsignal(s) for s in ray_session.SIGNALS}
    ray_session.shutdown()
    assert {s: signal.getsignal(s) for s in ray_session.SIGNALS} == before
