"""What workers and replicas hold: the controller seen from the data path, never a reason to stop serving."""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import numpy as np

from pipeline.feedback import FeedbackWindow

from .actor import DEFAULT_NAMESPACE
from .state import ControllerState, as_state

__all__ = ["ControllerClient"]

logger = logging.getLogger(__name__)


class ControllerClient:
    """Worker-side view of the controller. Never raises: the last good state always stands.

    ``report`` is fire-and-forget (failures are counted when their replies come back, or when the
    actor cannot be found); ``maybe_refresh`` fetches the state every ``refresh_every`` batches, or
    sooner when a report reply shows a newer version, waiting at most ``timeout_s``. A fetch that times
    out stays pending and is collected by a later call, so a restarting controller sees one request per
    client, not a pile. A lost handle is looked up again by name, at most every ``reconnect_every_s``.

    Args:
        name, namespace: the controller actor's name and namespace.
        initial_state: state to use until the first fetch (else one fetch is tried at construction).
        refresh_every: batches between fetches for ``maybe_refresh``.
        timeout_s: longest wait for a state fetch.
        reconnect_every_s: least time between name look-ups after a failure.
        max_in_flight: reports whose replies are tracked (older ones are forgotten, not failed).
    """

    def __init__(
        self,
        name: str,
        namespace: str = DEFAULT_NAMESPACE,
        initial_state: ControllerState | dict[str, Any] | None = None,
        refresh_every: int = 8,
        timeout_s: float = 2.0,
        reconnect_every_s: float = 5.0,
        max_in_flight: int = 256,
        handle: Any = None,
    ) -> None:
        if refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every} must be >= 1")
        self.name = name
        self.namespace = namespace
        self.refresh_every = refresh_every
        self.timeout_s = timeout_s
        self.reconnect_every_s = reconnect_every_s
        self.max_in_flight = max_in_flight
        self._handle = handle
        self._last_lookup = float("-inf")
        self._state = as_state(initial_state)
        self._pending_get: Any = None
        self._in_flight: deque = deque()
        self._batches = 0
        self._seen_version = -1
        self.reports_sent = 0
        self.reports_failed = 0
        self.refreshes = 0
        self.refresh_failures = 0
        if self._state is None:
            self.refresh()

    @classmethod
    def for_policy(cls, controller: dict[str, Any], policy) -> ControllerClient:
        """A client of a deployment's controller (`controller`: name, namespace, refresh_every_batches) that
        starts from the ExitPolicy the worker or replica already runs, so no fetch blocks its start."""
        initial = ControllerState(version=int(policy.version), thresholds=[float(t) for t in policy.thresholds],
                                  active=[bool(a) for a in policy.active])
        return cls(controller["name"], controller["namespace"], initial_state=initial,
                   refresh_every=controller["refresh_every_batches"])

    def refresh_policy(self, predictor) -> bool:
        """Refresh when due and swap newer thresholds into `predictor`; True when they changed."""
        from pipeline.engine.policy import ExitPolicy

        self.maybe_refresh()
        if self.version <= predictor.policy.version:
            return False
        predictor.set_policy(ExitPolicy(self.thresholds, self.active, self.version))
        return True

    # ----- state -----
    @property
    def state(self) -> ControllerState | None:
        return self._state

    @property
    def version(self) -> int:
        """Version of the state in use; -1 before any state was obtained."""
        return -1 if self._state is None else self._state.version

    @property
    def thresholds(self) -> np.ndarray | None:
        return None if self._state is None else np.asarray(self._state.thresholds, dtype=np.float64)

    @property
    def active(self) -> np.ndarray | None:
        return None if self._state is None else np.asarray(self._state.active, dtype=bool)

    @property
    def feedback_fraction(self) -> float:
        """Share of rows the controller asks to be run to the end as feedback (0 when it asks for none)."""
        return 0.0 if self._state is None else float(self._state.feedback_fraction)

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "reports_sent": self.reports_sent,
            "reports_failed": self.reports_failed,
            "refreshes": self.refreshes,
            "refresh_failures": self.refresh_failures,
            "connected": self._handle is not None,
        }

    # ----- calls -----
    def report(self, window: FeedbackWindow | dict[str, Any], output_rows: int = 0) -> bool:
        """Send feedback, drawn from ``output_rows`` answered rows, without waiting. Returns False (and counts
        it) when it could not be sent."""
        try:
            self._reap()
            handle = self._get_handle()
            if handle is None:
                self.reports_failed += 1
                return False
            if isinstance(window, FeedbackWindow):  # numpy arrays travel cheaper than lists
                window = {"conf": window.conf, "pred": window.pred, "final": window.final,
                          **({} if window.reference is None else {"reference": window.reference})}
            if output_rows:
                window = {**window, "output_rows": int(output_rows)}
            self._in_flight.append(handle.report.remote(window))
            while len(self._in_flight) > self.max_in_flight:
                self._in_flight.popleft()
            self.reports_sent += 1
            return True
        except Exception as exc:
            self.reports_failed += 1
            self._handle = None
            logger.debug("report to controller %s failed: %s", self.name, exc)
            return False

    def calibrate(self, thresholds, evidence: dict | None = None, timeout_s: float = 60.0) -> None:
        """Make the controller hold `thresholds` (certified on a job's own rows) and take its state; raises when
        the controller cannot be reached: a decision every worker must follow is never dropped silently."""
        import ray

        handle = self._handle or ray.get_actor(self.name, namespace=self.namespace)
        self._handle = handle
        self._state = ControllerState.from_dict(
            ray.get(handle.calibrate.remote([float(t) for t in thresholds], evidence), timeout=timeout_s))

    def maybe_refresh(self, every_n_batches: int | None = None) -> bool:
        """Count one batch; fetch the state when due (or a newer version was seen). True if updated.

        Between due calls a fetch left pending by a timeout is only polled, never waited for, so an
        unreachable controller costs a worker at most ``timeout_s`` every ``every_n_batches`` batches.
        """
        self._batches += 1
        n = every_n_batches or self.refresh_every
        try:
            self._reap()
        except Exception:
            pass
        due = self._batches % n == 0 or self._seen_version > self.version
        if due:
            return self.refresh()
        if self._pending_get is not None:
            return self.refresh(timeout_s=0.0)
        return False

    def refresh(self, timeout_s: float | None = None) -> bool:
        """Fetch the state now, waiting at most ``timeout_s`` (default: the client's). True if received."""
        import ray
        from ray.exceptions import GetTimeoutError

        wait = self.timeout_s if timeout_s is None else timeout_s
        try:
            if self._pending_get is None:
                handle = self._get_handle()
                if handle is None:
                    self.refresh_failures += 1
                    return False
                self._pending_get = handle.get_state.remote()
            d = ray.get(self._pending_get, timeout=wait)
            self._pending_get = None
            self._state = ControllerState.from_dict(d)
            self.refreshes += 1
            return True
        except GetTimeoutError:
            if wait > 0:
                self.refresh_failures += 1  # keep the request pending; a later call collects it
            return False
        except Exception as exc:
            self._pending_get = None
            self._handle = None
            self.refresh_failures += 1
            logger.debug("state fetch from controller %s failed: %s", self.name, exc)
            return False

    # ----- internals -----
    def _get_handle(self):
        if self._handle is not None:
            return self._handle
        now = time.monotonic()
        if now - self._last_lookup < self.reconnect_every_s:
            return None
        self._last_lookup = now
        try:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        except Exception as exc:
            logger.debug("controller %s/%s not found: %s", self.namespace, self.name, exc)
            self._handle = None
        return self._handle

    def _reap(self) -> None:
        """Collect finished report replies: count failures, note the newest version seen."""
        if not self._in_flight:
            return
        import ray

        refs = list(self._in_flight)
        ready, rest = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            try:
                self._seen_version = max(self._seen_version, int(ray.get(ref, timeout=0)))
            except Exception:
                self.reports_failed += 1
        self._in_flight = deque(rest)

    def __getstate__(self) -> dict[str, Any]:
        # Handles and object refs are tied to one process; a copied client looks the actor up again.
        d = self.__dict__.copy()
        d["_handle"] = None
        d["_pending_get"] = None
        d["_in_flight"] = deque()
        d["_last_lookup"] = float("-inf")
        return d
