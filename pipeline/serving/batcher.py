"""A replica's own request queue: adaptive batches, one model run at a time, early release.

    submit(rows) --> bounded FIFO --(batch loop: plan -> take -> run in the worker thread)--> Predictor
         ^                                                                         |
         +------ per-request future, resolved from on_result as soon as ALL its rows are answered
                 (a row that exits at a ramp is answered before later layers of its batch run)

Why not `@serve.batch`: it hands results back only when the whole batch returns, so an early exit could
never shorten a request's latency. Here the engine's `on_result(i, prediction)` hook fires from the worker
thread at the row's ramp, and `loop.call_soon_threadsafe` completes the request's future right away.

Batch size follows load: while a batch runs, the queue fills by itself and the next batch takes what is
queued (up to max_batch_size / max_batch_tokens). When the model is idle and the queue is short, the loop
waits for batch-mates only if the measured arrival rate fills the target batch within
batch_wait_timeout_s; the target is the number of rows that arrive during one batch (Little's law), so
light load gets no wait at all and heavy load gets full batches.

Idle work: when the queue is empty, the loop runs `idle(busy)` in the worker thread (the replica finishes
release tails there); `busy()` turns true as soon as a text arrives, and idle work stops between layers.
So a request never waits behind idle work for more than one layer.

Every batch returns exactly one result per row, checked: rows the engine did not answer are filled from
its output, and if the batch fails every request still waiting in it gets `BatchFailed` (none hangs).
No Ray here: the replica wraps this; unit tests drive it directly.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from pipeline.engine.encoder import Encoded
from pipeline.engine.predictor import Prediction, PredictOutput
from pipeline.serving.config import BatchingSettings

__all__ = ["AdaptiveBatchPolicy", "Answer", "BatchFailed", "BatchQueue", "BatchReport", "QueueFull"]

log = logging.getLogger(__name__)

Runner = Callable[[Encoded, list, Callable[[int, Prediction], None]], PredictOutput]
"""(rows, keys, on_result) -> PredictOutput; runs in the worker thread (Predictor.predict_encoded)."""
IdleWork = Callable[[Callable[[], bool]], bool]
"""(busy) -> whether idle work remains; runs in the worker thread while the queue is empty."""


class QueueFull(Exception):
    """The bounded queue cannot take the request now; retry after `retry_after_s`."""

    def __init__(self, queued: int, limit: int, retry_after_s: int):
        super().__init__(f"overloaded: {queued} texts already queued (limit {limit}); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class BatchFailed(RuntimeError):
    """The batch holding the request failed before the request's rows were answered."""


class AdaptiveBatchPolicy:
    """How long to wait for batch-mates, from the measured arrival rate and batch duration.

    rate: a decaying count of arrived rows (time constant `tau_s`), i.e. rows/s over the last ~tau_s.
    target batch = rows that arrive while one batch runs = rate x batch seconds, in [1, max_batch_size].
    """

    def __init__(self, max_batch_size: int, wait_timeout_s: float, tau_s: float = 1.0, alpha: float = 0.2):
        self.max_batch_size = int(max_batch_size)
        self.wait_timeout_s = float(wait_timeout_s)
        self.tau_s = float(tau_s)
        self.alpha = float(alpha)
        self._count = 0.0
        self._last = None  # time of the last arrival
        self.batch_s = 0.0
        """EWMA of batch run time (s)."""
        self.rows_per_s = 0.0
        """EWMA of rows per second while a batch runs (service rate)."""

    def on_arrival(self, rows: int, now: float) -> None:
        if self._last is not None:
            self._count *= math.exp(-(now - self._last) / self.tau_s)
        self._count += rows
        self._last = now

    def on_batch(self, rows: int, seconds: float) -> None:
        a = self.alpha if self.batch_s else 1.0
        self.batch_s = (1 - a) * self.batch_s + a * seconds
        if seconds > 0:
            self.rows_per_s = (1 - a) * self.rows_per_s + a * rows / seconds

    def rate(self, now: float) -> float:
        if self._last is None:
            return 0.0
        return self._count * math.exp(-(now - self._last) / self.tau_s) / self.tau_s

    def target(self, now: float) -> int:
        return int(min(self.max_batch_size, max(1, round(self.rate(now) * self.batch_s))))

    def wait_s(self, queued_rows: int, oldest_age_s: float, now: float) -> float:
        """0 = run now; else wait this long (or until another arrival) and ask again."""
        need = self.target(now) - queued_rows
        budget = self.wait_timeout_s - oldest_age_s
        rate = self.rate(now)
        if need <= 0 or budget <= 0 or rate <= 0:
            return 0.0
        fill = need / rate
        return fill if fill <= budget else 0.0  # waiting cannot fill the batch in time: go now

    def retry_after_s(self, queued_rows: int) -> int:
        """Whole seconds to drain the queue at the measured service rate, 1..60."""
        if self.rows_per_s <= 0:
            return 1
        return int(min(60, max(1, math.ceil(queued_rows / self.rows_per_s))))


@dataclass
class _Request:
    encoded: Encoded
    keys: list
    future: asyncio.Future
    tokens: int
    enqueued: float
    results: list = field(default_factory=list)
    remaining: int = 0
    state: str = "queued"  # queued -> running -> done
    started: float | None = None
    released: float | None = None

    def __post_init__(self):
        self.results = [None] * len(self.encoded)
        self.remaining = len(self.encoded)


@dataclass
class Answer:
    """A request's answers, in order, and where its time went (TEI's x-queue-time / x-inference-time)."""

    predictions: list[Prediction]
    queue_s: float
    """Enqueued -> its batch started."""
    inference_s: float
    """Its batch started -> its last text answered (early release ends it before the batch ends)."""


@dataclass
class BatchReport:
    """What one batch did; the replica turns it into metrics and controller feedback."""

    rows: int
    requests: int
    seconds: float
    queue_wait_s: list[float]
    """Per request: enqueue -> batch start."""
    release_lead_s: list[float]
    """Per request answered before its batch ended: how long before (the early-release gain)."""
    output: PredictOutput | None
    error: str | None


class BatchQueue:
    """Bounded FIFO of requests + the batch loop. Lives on one asyncio loop (started on first submit)."""

    def __init__(self, runner: Runner, settings: BatchingSettings,
                 on_batch: Callable[[BatchReport], None] | None = None, clock: Callable[[], float] = time.monotonic,
                 idle: IdleWork | None = None):
        self.runner = runner
        self.settings = settings
        self.on_batch = on_batch
        self.idle = idle
        self._idle_pending = False  # a batch ran since idle work last said it was done
        self.clock = clock
        self.policy = AdaptiveBatchPolicy(settings.max_batch_size, settings.batch_wait_timeout_s)
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="offramp-batch")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        self.running = False
        self.batches = 0
        self.failed_batches = 0
        self.rejected = 0

    # -- public ---------------------------------------------------------------------------------
    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def healthy(self) -> bool:
        return not self._closed and (self._task is None or not self._task.done())

    async def submit(self, encoded: Encoded, keys: list) -> list[Prediction]:
        """One Prediction per row, in order, once every row is answered. Raises QueueFull, BatchFailed."""
        return (await self.submit_timed(encoded, keys)).predictions

    async def submit_timed(self, encoded: Encoded, keys: list) -> Answer:
        """`submit`, with the request's queue and inference time."""
        n = len(encoded)
        if n != len(keys):
            raise ValueError(f"{n} rows but {len(keys)} keys")
        if n == 0:
            return Answer([], 0.0, 0.0)
        if self._closed:
            raise BatchFailed("the replica is shutting down; retry")
        self._ensure_started()
        if self._queued_rows + n > self.settings.max_queue:
            self.rejected += 1
            retry = self.policy.retry_after_s(self._queued_rows + n)
            raise QueueFull(self._queued_rows, self.settings.max_queue, retry)
        now = self.clock()
        req = _Request(encoded, list(keys), self._loop.create_future(), sum(len(x) for x in encoded.input_ids), now)
        self._queue.append(req)
        self._queued_rows += n
        self.policy.on_arrival(n, now)
        self._wakeup.set()
        try:
            predictions = await req.future
        except asyncio.CancelledError:  # the client went away: free its place in the queue
            if req.state == "queued":
                self._queue.remove(req)
                self._queued_rows -= n
                req.state = "done"
            raise
        started = req.started if req.started is not None else now
        released = req.released if req.released is not None else started
        return Answer(predictions, started - now, released - started)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking batches; let the running one finish (cancelled after `timeout_s`); requests still
        queued get BatchFailed."""
        self._closed = True
        if self._task is not None:
            self._wakeup.set()
            try:
                await asyncio.wait_for(self._task, timeout_s)
            except (asyncio.CancelledError, asyncio.TimeoutError, Exception):
                pass
        while self._queue:
            req = self._queue.popleft()
            if not req.future.done():
                req.future.set_exception(BatchFailed("the replica is shutting down; retry"))
        self._queued_rows = 0
        self._executor.shutdown(wait=False)

    # -- the loop: plan -> take -> run ------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._task = self._loop.create_task(self._run(), name="offramp-batch-loop")

    async def _run(self) -> None:
        while not self._closed:
            try:
                if not self._queue:
                    if self._idle_pending and self.idle is not None:
                        self._idle_pending = False  # stays off if the idle work raises
                        self._idle_pending = await self._loop.run_in_executor(self._executor, self.idle, self._busy)
                        continue
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                now = self.clock()
                wait = self.policy.wait_s(self._queued_rows, now - self._queue[0].enqueued, now)
                if wait > 0:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), wait)
                    except asyncio.TimeoutError:
                        pass
                    continue  # plan again with what arrived (the oldest's age bounds the total wait)
                batch = self._take()
                if batch:
                    await self._run_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any bug in one batch
                log.exception("batch loop error; continuing")
                await asyncio.sleep(0.01)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the queue's event loop (callable from any thread, e.g. from idle work)."""
        self._loop.call_soon_threadsafe(fn)

    def _busy(self) -> bool:  # worker thread: a text is waiting (or the replica is closing)
        return self._queued_rows > 0 or self._closed

    def _take(self) -> list[_Request]:
        """Whole requests, FIFO, under max_batch_size / max_batch_tokens (the first one always fits)."""
        s = self.settings
        batch: list[_Request] = []
        rows = tokens = 0
        while self._queue:
            req = self._queue[0]
            n = len(req.encoded)
            if batch and (rows + n > s.max_batch_size or tokens + req.tokens > s.max_batch_tokens):
                break
            self._queue.popleft()
            self._queued_rows -= n
            if req.future.done():  # cancelled meanwhile
                req.state = "done"
                continue
            req.state = "running"
            batch.append(req)
            rows += n
            tokens += req.tokens
        return batch

    async def _run_batch(self, batch: list[_Request]) -> None:
        loop = self._loop
        owners: list[tuple[_Request, int]] = [(r, i) for r in batch for i in range(len(r.encoded))]
        encoded = Encoded(
            [ids for r in batch for ids in r.encoded.input_ids],
            np.concatenate([np.asarray(r.encoded.truncated, bool) for r in batch]),
            [e for r in batch for e in r.encoded.errors],
        )
        keys = [k for r in batch for k in r.keys]

        def on_result(i: int, pred: Prediction) -> None:  # worker thread
            req, pos = owners[i]
            loop.call_soon_threadsafe(self._deliver, req, pos, pred)

        start = self.clock()
        for r in batch:
            r.started = start
        out: PredictOutput | None = None
        error: str | None = None
        self.running = True
        try:
            out = await loop.run_in_executor(self._executor, self.runner, encoded, keys, on_result)
            if out is None or len(out.predictions) != len(owners):
                got = "None" if out is None else len(out.predictions)
                error, out = f"engine returned {got} results for {len(owners)} texts", None
        except asyncio.CancelledError:
            error = "the replica is shutting down"
            raise
        except Exception as e:  # noqa: BLE001 - every request in the batch gets the error
            log.exception("batch of %d texts failed", len(owners))
            error = f"inference failed: {e!r}"
        finally:
            self.running = False
            end = self.clock()
            self._finish(batch, owners, out, error, end)
            self.batches += 1
            self.failed_batches += error is not None
            self._idle_pending = True
            self.policy.on_batch(len(owners), end - start)
        if self.on_batch is not None:
            report = BatchReport(
                rows=len(owners), requests=len(batch), seconds=end - start,
                queue_wait_s=[start - r.enqueued for r in batch],
                release_lead_s=[end - r.released for r in batch if r.released is not None and r.released < end],
                output=out, error=error,
            )
            try:
                self.on_batch(report)
            except Exception:  # noqa: BLE001 - metrics/feedback trouble never stops serving
                log.exception("on_batch hook failed")

    def _deliver(self, req: _Request, pos: int, pred: Prediction) -> None:
        if req.future.done() or req.results[pos] is not None:
            return
        req.results[pos] = pred
        req.remaining -= 1
        if req.remaining == 0:
            req.released = self.clock()
            req.state = "done"
            req.future.set_result(req.results)

    def _finish(self, batch, owners, out: PredictOutput | None, error: str | None, now: float) -> None:
        """Exactly one outcome per request: fill unanswered rows from the output, or fail the request."""
        offset = 0
        for req in batch:
            n = len(req.encoded)
            if not req.future.done():
                if out is not None:
                    for pos in range(n):
                        if req.results[pos] is None:
                            self._deliver(req, pos, out.predictions[offset + pos])
                    req.released = now
                else:
                    req.future.set_exception(BatchFailed(error or "inference failed"))
                req.state = "done"
            offset += n
