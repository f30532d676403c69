"""What one replica does apart from HTTP: host the engine, queue and batch requests, feed the controller.

    texts --encode (validate + tokenize, on the event loop)--> BatchQueue --worker thread--> Predictor
    after each batch: metrics; feedback -> ControllerClient.report (controller thread, fire-and-forget);
    every few batches the thresholds are refreshed and swapped into the Predictor.
    release mode: the rows a batch answered at a ramp wait in a bounded list of tails; when the queue is
    empty the worker thread runs them to the end (feedback), stopping as soon as a text arrives.

Controller calls run on their own thread so a slow or restarting controller never delays a batch; when
the controller is down the replica keeps its last thresholds and keeps serving.
"""
from __future__ import annotations

import importlib
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipeline.data import storage
from pipeline.engine.encoder import Encoded, TextEncoder
from pipeline.engine.microbatch import TokenBudget
from pipeline.engine.predictor import Prediction
from pipeline.feedback import FeedbackWindow
from pipeline.serving.batcher import Answer, BatchQueue, BatchReport
from pipeline.serving.config import ServeAppConfig
from pipeline.serving.metrics import ServingMetrics

__all__ = ["ReplicaEngine", "import_class"]

log = logging.getLogger(__name__)


def import_class(path: str):
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import predictor_class={path!r}: {e}") from e


class _OnlineBudget(TokenBudget):
    """Online, the queue already bounds a batch (max_batch_size / max_batch_tokens), so the engine runs it
    as one micro-batch whenever it fits the token budget: splitting it would make the rows of the later
    micro-batches wait for whole earlier passes. The budget does not drift with latency (a slow, shared
    CPU would otherwise shrink it to single rows); it still halves on out-of-memory."""

    def observe(self, tokens: int, seconds: float) -> None:
        return None


class ReplicaEngine:
    """Predictor + BatchQueue + controller sync + metrics for one replica.

    Args:
        config: the application's settings.
        controller: {"name", "namespace", "refresh_every_batches"} of the shared controller, or None.
        replica: this replica's id (metrics label, response header).
        client: a ready ControllerClient-like object (tests); default: built from `controller`.
        metrics_backend: "ray" in a Serve replica (Ray's metrics export, whole app), "local" elsewhere.
    """

    def __init__(self, config: ServeAppConfig, controller: dict | None = None, replica: str = "local",
                 client=None, metrics_backend: str = "local"):
        self.config = config
        self.replica = replica
        storage.configure(config.storage)  # the app's block; else what the environment says
        self.predictor = p = import_class(config.predictor_class)(config.model, config.engine)
        p.budget = _OnlineBudget(p.config.token_budget, p.config.max_token_budget, p.config.latency_target_s)
        log.info("replica %s warmed up in %.1f s", replica, p.warm_up())  # a compiled model compiles now
        self.num_layers = self.predictor.model.num_layers
        self._defer = config.engine.mode == "release"  # release tails run when the replica is idle
        self._tails: deque = deque()  # appended on the event loop, taken in the worker thread
        self.metrics = ServingMetrics(replica, metrics_backend)
        self._encoders: dict[str | None, TextEncoder] = {None: p.encoder}  # by truncation side; None = tokenizer's
        self.queue = BatchQueue(self._run, config.batching, on_batch=self._on_batch,
                                idle=self._finish_tails if self._defer else None)
        self.client = client
        if self.client is None and controller:
            from pipeline.control.client import ControllerClient

            self.client = ControllerClient.for_policy(controller, p.policy)
        self._ctl_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offramp-controller")
        self._ctl_busy = False
        self._feedback: deque[FeedbackWindow] = deque()  # from both threads; drained by the controller sync
        self._answered = 0  # texts answered since feedback was last handed over (event loop)

    # -- requests ---------------------------------------------------------------------------------
    def encode(self, texts: list[str], truncation_side: str | None = None) -> Encoded:
        """Tokenize; `truncation_side` "left"/"right" cuts long texts on that side (None: the tokenizer's)."""
        enc = self._encoders.get(truncation_side)
        if enc is None:
            enc = self._encoders[truncation_side] = TextEncoder(self.predictor.tokenizer, self.predictor.max_length,
                                                                truncation_side)
        return enc.encode(texts)

    def token_count(self, text: str) -> int:
        """Tokens of `text` uncut (an error message's number)."""
        return len(self.predictor.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    async def predict(self, encoded: Encoded, keys: list[str]) -> list[Prediction]:
        """Answers in order; raises QueueFull (-> 429) or BatchFailed (-> 424)."""
        return await self.queue.submit(encoded, keys)

    async def predict_timed(self, encoded: Encoded, keys: list[str]) -> Answer:
        """`predict` with the request's queue and inference time."""
        return await self.queue.submit_timed(encoded, keys)

    def _run(self, encoded: Encoded, keys: list, on_result) -> object:  # worker thread
        shadow = None
        if self.config.engine.mode == "exit" and self.client is not None and self.client.feedback_fraction:
            from pipeline.engine.predictor import key_uniforms

            # the controller asks for more feedback while its evidence is thin (TuningConfig.feedback_*)
            share = max(self.config.engine.shadow_fraction, self.client.feedback_fraction)
            shadow = key_uniforms(keys, "shadow") < share
        return self.predictor.predict_encoded(encoded, keys, self.config.engine.mode, on_result=on_result,
                                              defer_tail=self._defer, shadow=shadow)

    def _finish_tails(self, busy: Callable[[], bool]) -> bool:  # worker thread, queue empty
        """Run the oldest waiting release tail to the end and send its feedback to the controller. Dropped
        (no feedback from its rows) if a text arrives first. Returns whether tails remain."""
        if not self._tails or busy():  # a text came first: the tail waits, no work was spent on it yet
            return bool(self._tails)
        tail = self._tails[0]  # left in place while it runs: /health counts it as waiting
        try:
            got = self.predictor.finish_tail(tail, stop=busy)
        finally:
            self._tails.popleft()  # only the batch loop's task adds or evicts tails, and it is awaiting this
        self.metrics.tail(tail.rows, finished=got is not None)
        if got is not None:
            window, agree = got
            self.metrics.feedback(agree, len(window))
            if self.client is not None:
                self._feedback.append(window)
                self.queue.call_soon(self._flush_feedback)
        return bool(self._tails)

    # -- after each batch -------------------------------------------------------------------------
    def _on_batch(self, report: BatchReport) -> None:  # event loop
        self.metrics.batch(report, self.num_layers)
        self.metrics.status(self.queue.queued_rows, int(self.predictor.policy.version), self._controller_failures())
        if report.output is not None:
            for tail in report.output.tails:
                if len(self._tails) >= self.config.batching.max_waiting_tails:
                    self.metrics.tail(self._tails.popleft().rows, finished=False)  # the oldest goes
                self._tails.append(tail)
        if self.client is None:
            return
        if report.output is not None:
            self._answered += len(report.output.predictions)
            if len(report.output.feedback):
                self._feedback.append(report.output.feedback)
        self._flush_feedback(batch_done=True)

    def _flush_feedback(self, batch_done: bool = False) -> None:  # event loop
        """Hand the feedback gathered so far to the controller thread (after a batch, also with none: the
        thresholds refresh every few batches), unless it is still busy (then the next flush takes it)."""
        if not self._ctl_busy and (batch_done or self._feedback):
            windows = [self._feedback.popleft() for _ in range(len(self._feedback))]
            answered = self._answered if windows else 0  # counted with the next feedback otherwise
            self._answered -= answered
            self._ctl_busy = True
            fut = self._ctl_executor.submit(self._sync_controller, windows, answered)
            fut.add_done_callback(self._ctl_done)

    def _ctl_done(self, _fut) -> None:
        self._ctl_busy = False

    def _sync_controller(self, windows: list[FeedbackWindow], answered: int = 0) -> None:  # controller thread
        """Report feedback (fire-and-forget), refresh thresholds when due, swap them in. Never raises."""
        try:
            if windows:
                self.client.report(windows[0] if len(windows) == 1 else FeedbackWindow.concat(windows),
                                   output_rows=answered)
            if self.client.refresh_policy(self.predictor):
                log.info("replica %s: thresholds version %d", self.replica, self.client.version)
        except Exception:  # noqa: BLE001 - the controller is an optimisation, never a dependency
            log.exception("controller sync failed; keeping thresholds version %d", self.predictor.policy.version)

    # -- status -----------------------------------------------------------------------------------
    def health(self) -> dict:
        ctl = self.client.stats() if self.client is not None else None
        return {
            "status": "ok" if self.queue.healthy else "unhealthy",
            "replica": self.replica,
            "mode": self.config.engine.mode,
            "compression": self.predictor.compression,
            "queue_texts": self.queue.queued_rows,
            "running": self.queue.running,  # a batch is in the model now
            "waiting_tails": len(self._tails),
            "batches": self.queue.batches,
            "failed_batches": self.queue.failed_batches,
            "threshold_version": int(self.predictor.policy.version),
            "thresholds": [float(t) for t in self.predictor.policy.thresholds],
            "controller": ctl,
        }

    def _controller_failures(self) -> int:
        if self.client is None:
            return 0
        s = self.client.stats()
        return int(s.get("reports_failed", 0)) + int(s.get("refresh_failures", 0))

    def metrics_text(self) -> bytes:
        """This replica's metrics (the local backend; a Serve app answers GET /metrics from Ray's export)."""
        self.metrics.status(self.queue.queued_rows, int(self.predictor.policy.version), self._controller_failures())
        return self.metrics.render()

    async def close(self) -> None:
        await self.queue.close()
        self._ctl_executor.shutdown(wait=False)
