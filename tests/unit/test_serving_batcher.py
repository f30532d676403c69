"""The replica's own request queue, without Ray: one answer per request, bounded batches that grow with
the queue, early release through per-request futures, failures reach every request, overload -> QueueFull."""
import asyncio
import threading
import time

import numpy as np
import pytest

from pipeline.engine.encoder import Encoded
from pipeline.engine.predictor import Prediction, PredictOutput
from pipeline.serving.batcher import AdaptiveBatchPolicy, BatchFailed, BatchQueue, QueueFull
from pipeline.serving.config import BatchingSettings


def enc(n: int, length: int = 5) -> Encoded:
    return Encoded([[101] + [7] * (length - 2) + [102] for _ in range(n)], np.zeros(n, bool), [None] * n)


class EchoRunner:
    """Answers each row with its key as the label; records batch sizes; optional delay / failure."""

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None, announce: bool = True):
        self.delay_s, self.fail_on, self.announce = delay_s, fail_on, announce
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def __call__(self, encoded, keys, on_result):
        self.batches.append(list(keys))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in keys:
            raise RuntimeError("boom")
        preds = [Prediction(k, 0, 0.9, 3) for k in keys]
        if self.announce:
            for i, p in enumerate(preds):
                on_result(i, p)
        return PredictOutput(preds, feedback=None)  # type: ignore[arg-type]


class GatedRunner(EchoRunner):
    """An EchoRunner whose every batch sets `started` and then waits for `gate`: the test, not the machine's
    speed, decides how long the model is busy. With a `clock`, each batch advances it by `seconds`."""

    def __init__(self, clock=None, seconds: float = 0.0, **kw):
        super().__init__(**kw)
        self.started, self.gate = threading.Event(), threading.Event()
        self.clock, self.seconds = clock, seconds

    def __call__(self, encoded, keys, on_result):
        self.started.set()
        assert self.gate.wait(30), "the test never let the batch finish"
        if self.clock is not None:
            self.clock.t += self.seconds
        return super().__call__(encoded, keys, on_result)


async def busy_with(q: BatchQueue, runner: GatedRunner, key: str = "busy") -> asyncio.Future:
    """Submit `key` and return once the model runs it (and waits for the gate)."""
    fut = asyncio.ensure_future(q.submit(enc(1), [key]))
    assert await asyncio.to_thread(runner.started.wait, 30)
    return fut


def settings(**kw) -> BatchingSettings:
    base = dict(max_batch_size=8, max_batch_tokens=4096, batch_wait_timeout_s=0.0, max_queue=64,
                max_items_per_request=8)
    return BatchingSettings(**{**base, **kw})


def labels(preds):
    return [p.label for p in preds]


def test_concurrent_requests_each_get_their_own_answers_in_order():
    async def main():
        runner = EchoRunner(delay_s=0.01)
        q = BatchQueue(runner, settings())
        reqs = [[f"r{i}-t{j}" for j in range(1 + i % 3)] for i in range(20)]
        outs = await asyncio.gather(*(q.submit(enc(len(r)), r) for r in reqs))
        assert [labels(o) for o in outs] == reqs
        assert sum(len(b) for b in runner.batches) == sum(len(r) for r in reqs)  # every row run once
        assert runner.threads == {"offramp-batch_0"}  # one worker thread, never the event loop
        await q.close()

    asyncio.run(main())


def test_batches_respect_size_and_token_bounds_and_grow_with_the_queue():
    async def main():
        runner = GatedRunner()
        q = BatchQueue(runner, settings(max_batch_size=6, max_batch_tokens=40))
        first = await busy_with(q, runner, "first")  # `first` runs alone (idle model, light load: no waiting)
        rest = [asyncio.ensure_future(q.submit(enc(1, length=5), [f"x{i}"])) for i in range(20)]
        await asyncio.sleep(0)  # all 20 queued while `first` runs
        runner.gate.set()
        await asyncio.gather(first, *rest)
        sizes = [len(b) for b in runner.batches]
        assert sizes[0] == 1
        assert sum(sizes[1:]) == 20  # every text ran once
        assert sizes[1] == 6  # the 20 queued while `first` ran: the next batch is full (6 rows x 5 tokens <= 40)
        assert all(s <= 6 for s in sizes)
        # token bound: 10-token rows, 40 tokens per batch -> at most 4 rows
        runner.batches.clear()
        await asyncio.gather(*(q.submit(enc(1, length=10), [f"y{i}"]) for i in range(12)))
        assert all(len(b) <= 4 for b in runner.batches)
        await q.close()

    asyncio.run(main())


def test_a_request_bigger_than_the_batch_still_runs_alone():
    async def main():
        runner = EchoRunner()
        q = BatchQueue(runner, settings(max_batch_size=2, max_items_per_request=8))
        out = await q.submit(enc(5), [f"t{i}" for i in range(5)])
        assert labels(out) == [f"t{i}" for i in range(5)]
        await q.close()

    asyncio.run(main())


class FakeClock:
    """The queue's clock, moved only by the test's runner: timings are exact, not whatever the machine did."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_early_release_resolves_a_request_before_its_batch_finishes():
    clock, late_may_finish = FakeClock(), threading.Event()

    def runner(encoded, keys, on_result):
        on_result(keys.index("early"), Prediction("early", 0, 0.99, 1))  # exits at ramp 1
        assert late_may_finish.wait(30)  # the test has seen `early` answered while this batch still runs
        clock.t += 0.4  # the later layers of the batch
        preds = [Prediction(k, 0, 0.9, 4) for k in keys]
        on_result(keys.index("late"), preds[keys.index("late")])
        return PredictOutput([Prediction("early", 0, 0.99, 1) if k == "early" else p for k, p in zip(keys, preds)],
                             feedback=None)  # type: ignore[arg-type]

    async def main():
        reports = []
        q = BatchQueue(runner, settings(batch_wait_timeout_s=0.0), on_batch=reports.append, clock=clock)
        # both queued before the loop's next turn -> one batch
        early = asyncio.ensure_future(q.submit_timed(enc(1), ["early"]))
        late = asyncio.ensure_future(q.submit_timed(enc(1), ["late"]))
        a = await asyncio.wait_for(early, 30)
        assert not late.done()  # `early` was answered at its ramp, before its batch finished
        late_may_finish.set()
        b = await asyncio.wait_for(late, 30)
        assert a.predictions[0].exit_layer == 1 and b.predictions[0].exit_layer == 4
        # TEI's x-inference-time: `early` at its ramp, `late` after the batch's later layers; neither queued
        assert (a.inference_s, b.inference_s, a.queue_s, b.queue_s) == pytest.approx((0.0, 0.4, 0.0, 0.0))
        for _ in range(10_000):  # the report is made after the worker thread's last answer reaches the loop
            if reports:
                break
            await asyncio.sleep(0)
        assert len(reports) == 1 and reports[0].rows == 2
        # how long before the batch's end each request was answered: `early` 0.4 s; `late` at the end (no lead)
        assert reports[0].release_lead_s == pytest.approx([0.4])
        await q.close()

    asyncio.run(main())


def test_a_failing_batch_fails_every_request_in_it_and_the_queue_recovers():
    async def main():
        runner = EchoRunner(fail_on="bad")
        q = BatchQueue(runner, settings())
        results = await asyncio.wait_for(
            asyncio.gather(q.submit(enc(1), ["ok1"]), q.submit(enc(1), ["bad"]), q.submit(enc(2), ["ok2", "ok3"]),
                           return_exceptions=True), timeout=5)
        assert all(isinstance(r, BatchFailed) for r in results), results
        assert "boom" in str(results[0])
        assert labels(await q.submit(enc(1), ["after"])) == ["after"]
        assert q.failed_batches == 1 and q.healthy
        await q.close()

    asyncio.run(main())


def test_unannounced_rows_are_filled_from_the_output_and_short_outputs_fail():
    async def main():
        q = BatchQueue(EchoRunner(announce=False), settings())
        assert labels(await q.submit(enc(2), ["a", "b"])) == ["a", "b"]
        await q.close()

        def short(encoded, keys, on_result):
            return PredictOutput([Prediction("x", 0, 0.5, 1)], feedback=None)  # type: ignore[arg-type]

        q = BatchQueue(short, settings())
        with pytest.raises(BatchFailed, match="1 results for 2 texts"):
            await asyncio.wait_for(q.submit(enc(2), ["a", "b"]), timeout=5)
        await q.close()

    asyncio.run(main())


def test_queue_time_is_the_wait_for_a_running_batch():
    clock = FakeClock()
    runner = GatedRunner(clock, seconds=0.3)  # each batch takes 0.3 s of the queue's clock

    async def main():
        q = BatchQueue(runner, settings(), clock=clock)
        busy = asyncio.ensure_future(q.submit_timed(enc(1), ["busy"]))
        assert await asyncio.to_thread(runner.started.wait, 30)  # `busy` is running; `next` waits for it
        nxt = asyncio.ensure_future(q.submit_timed(enc(1), ["next"]))
        await asyncio.sleep(0)
        runner.gate.set()
        first, second = await busy, await nxt
        assert (first.queue_s, first.inference_s) == pytest.approx((0.0, 0.3))
        assert (second.queue_s, second.inference_s) == pytest.approx((0.3, 0.3))  # waited for `busy`, then ran
        await q.close()

    asyncio.run(main())


def test_overload_is_refused_at_once_with_retry_after_and_recovers():
    async def main():
        runner = GatedRunner()
        q = BatchQueue(runner, settings(max_queue=4, max_batch_size=2, max_items_per_request=2))
        running = await busy_with(q, runner)
        queued = [asyncio.ensure_future(q.submit(enc(2), [f"q{i}a", f"q{i}b"])) for i in range(2)]
        await asyncio.sleep(0)
        assert q.queued_rows == 4
        with pytest.raises(QueueFull) as e:  # refused while the model is still busy: it did not wait for room
            await q.submit(enc(1), ["one too many"])
        assert e.value.retry_after_s >= 1 and not running.done()
        runner.gate.set()
        await asyncio.gather(running, *queued)
        assert labels(await q.submit(enc(1), ["later"])) == ["later"]  # recovered
        assert q.rejected == 1
        await q.close()

    asyncio.run(main())


def test_a_cancelled_request_frees_its_place_and_is_not_run():
    async def main():
        runner = GatedRunner()
        q = BatchQueue(runner, settings(max_queue=4, max_items_per_request=4))
        busy = await busy_with(q, runner)
        gone = asyncio.ensure_future(q.submit(enc(3), ["g1", "g2", "g3"]))
        await asyncio.sleep(0)
        assert q.queued_rows == 3
        gone.cancel()
        await asyncio.sleep(0)
        assert q.queued_rows == 0
        runner.gate.set()
        await busy
        assert labels(await q.submit(enc(1), ["next"])) == ["next"]
        assert all("g1" not in b for b in runner.batches)
        await q.close()

    asyncio.run(main())


def test_close_finishes_the_running_batch_and_fails_queued_requests():
    async def main():
        runner = GatedRunner()
        q = BatchQueue(runner, settings())
        a = await busy_with(q, runner, "a")
        b = asyncio.ensure_future(q.submit(enc(1), ["b"]))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(q.close())
        await asyncio.sleep(0)
        runner.gate.set()
        await closing
        res = await asyncio.wait_for(asyncio.gather(a, b, return_exceptions=True), timeout=5)
        assert labels(res[0]) == ["a"]  # the running batch finishes
        assert isinstance(res[1], BatchFailed)  # the queued one is told, not left hanging
        with pytest.raises(BatchFailed):
            await q.submit(enc(1), ["c"])

    asyncio.run(main())


def test_policy_waits_only_when_the_arrival_rate_can_fill_the_batch_in_time():
    p = AdaptiveBatchPolicy(max_batch_size=32, wait_timeout_s=0.01)
    assert p.wait_s(1, 0.0, now=0.0) == 0.0  # nothing measured: go now
    p.on_batch(8, 0.05)  # one batch takes 50 ms
    for i in range(1000):  # 200 rows/s for 5 s
        p.on_arrival(1, i * 0.005)
    now = 1000 * 0.005
    assert 8 <= p.target(now) <= 12  # ~rate x batch time
    w = p.wait_s(9, 0.0, now)
    assert 0 < w <= 0.01  # a few ms to fill the last rows
    assert p.wait_s(1, 0.0, now) == 0.0  # cannot fill 9 rows in 10 ms at 200/s: go now
    assert p.wait_s(9, 0.02, now) == 0.0  # the oldest already waited past the timeout
    assert p.wait_s(50, 0.0, now) == 0.0  # queue already long
    # light load: target 1 -> never wait
    q = AdaptiveBatchPolicy(32, 0.01)
    q.on_batch(1, 0.02)
    q.on_arrival(1, 0.0)
    q.on_arrival(1, 1.0)
    assert q.target(1.0) == 1 and q.wait_s(1, 0.0, 1.0) == 0.0
    # Retry-After: the queue's drain time at the measured service rate, whole seconds, >= 1
    r = AdaptiveBatchPolicy(32, 0.01)
    assert r.retry_after_s(100) == 1
    r.on_batch(10, 1.0)
    assert r.retry_after_s(100) == 10
