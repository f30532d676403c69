"""This process's Ray session, for a command that starts or joins Ray (`offramp run`, `offramp serve`): stop
cleanly on SIGTERM or SIGINT, and leave nothing running that it started.

    init(**ray_init_kwargs)   ray.init, then SIGTERM / SIGINT raise Interrupted in the main thread
    ...                       the command's own `finally:` cleans up (Serve, its controller)
    shutdown()                ray.shutdown, then end whatever the embedded Ray started that outlived it

Why not Ray's own handling (2.60, checked here): ray.init installs a Python SIGTERM handler (sys.exit), but the
driver's core worker then installs a C++ failure-signal handler in front of it that calls it and aborts the
process 3 s later (abseil's alarm_on_failure_secs). Any cleanup slower than that (serve.shutdown drains for
~2 s) dies before ray.shutdown: the kernel kills the raylet and GCS with their parent (PR_SET_PDEATHSIG), and
the raylet's own children, `ray::DashboardAgent` and `ray::RuntimeEnvAgent`, outlive it: they notice their
raylet is gone, then block for up to 60 s reporting it to the GCS, which is gone too. ray.shutdown itself gives
the raylet 1 s to stop before SIGKILL, which orphans the agents the same way when the raylet is slow.
Heavy imports (ray, psutil) stay inside the functions.
"""
from __future__ import annotations

import atexit
import logging
import signal
import threading
import time

__all__ = ["Interrupted", "init", "shutdown"]

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived (`signum` says which). A KeyboardInterrupt, so code that stops on Ctrl-C
    stops the same way on SIGTERM."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_started: list = []  # psutil.Process: what ray.init started in this process (an embedded Ray's node)
_handlers: dict | None = None  # the signal handlers from before init(), restored by shutdown()


def _raise(signum, frame):
    raise Interrupted(signum)


def init(**kwargs) -> None:
    """ray.init(**kwargs); from then on SIGTERM and SIGINT raise Interrupted in the main thread (replacing
    Ray's handler, which aborts the process 3 s after SIGTERM), until shutdown()."""
    global _started, _handlers
    import ray
    import psutil  # after ray: Ray ships it

    me = psutil.Process()
    before = {p.pid for p in me.children()}
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    ray.init(**kwargs)
    _started = [p for p in me.children() if p.pid not in before]  # none when joining a cluster
    atexit.register(shutdown)  # should a caller's cleanup be cut short (a second Ctrl-C); runs before Ray's own
    if threading.current_thread() is threading.main_thread():
        _handlers = previous
        for s in SIGNALS:
            signal.signal(s, _raise)


def shutdown(grace_s: float = 1.0) -> None:
    """ray.shutdown(), then end every process the embedded Ray started (and their children) still running
    `grace_s` later: SIGTERM, then SIGKILL. Signals are held off meanwhile, so a second Ctrl-C cannot cut the
    stop short; the handlers from before init() are restored."""
    global _started, _handlers
    import ray
    import psutil

    atexit.unregister(shutdown)
    held = threading.current_thread() is threading.main_thread()
    if held:
        current = {s: signal.getsignal(s) for s in SIGNALS}
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)
    try:
        ours = []  # listed before ray.shutdown: an orphan no longer names its parent
        for p in _started:
            try:
                ours += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        ray.shutdown()
        _end(ours, grace_s)
    finally:
        _started = []
        if held:
            for s, h in (_handlers or current).items():
                if h is not None:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(s, h)
            _handlers = None


def _end(procs: list, grace_s: float) -> None:
    import psutil

    alive = _wait(procs, grace_s)
    if not alive:
        return
    log.info("ending %d Ray process(es) left after ray.shutdown: %s", len(alive),
             ", ".join(f"{p.pid} {_name(p)}" for p in alive))
    for sig, wait_s in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0)):
        for p in alive:
            try:
                p.send_signal(sig)  # psutil checks the pid was not reused
            except psutil.NoSuchProcess:
                pass
        alive = _wait(alive, wait_s)
        if not alive:
            return
    log.warning("Ray processes still running after SIGKILL: %s", [p.pid for p in alive])


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE  # a zombie is gone, only not yet reaped
    except psutil.NoSuchProcess:
        return False


def _wait(procs: list, timeout_s: float) -> list:
    """The processes still running after up to `timeout_s` (polled: most are not this process's children)."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _running(p)]
    return alive


def _name(p) -> str:
    try:
        return " ".join(p.cmdline())[:80] or p.name()
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"
