import numpy as np

from pipeline.engine.microbatch import MicroBatchQueue, TokenBudget, plan_microbatches


def test_every_row_once_and_under_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, 1000)
    batches = plan_microbatches(lengths, token_budget=2048, max_rows=64)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    for b in batches:
        assert len(b) <= 64
        assert len(b) * lengths[b].max() <= 2048 or len(b) == 1


def test_sorted_batches_pad_less_than_input_order():
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 60, 640)
    sorted_pad = sum(len(b) * lengths[b].max() for b in plan_microbatches(lengths, 64 * 60, 64))
    input_order = sum(64 * lengths[i : i + 64].max() for i in range(0, 640, 64))
    assert sorted_pad < 0.8 * input_order


def test_row_longer_than_budget_gets_its_own_batch():
    batches = plan_microbatches([500, 3, 3], token_budget=100, max_rows=8)
    assert [len(b) for b in batches] == [1, 2]


def test_queue_cuts_each_batch_at_the_budget_given_and_runs_retries_first():
    q = MicroBatchQueue([10, 40, 20, 30], max_rows=8)
    assert q.pop(token_budget=80).tolist() == [1, 3]  # 2 rows of the longest (40) fit 80 tokens
    q.retry_first([np.array([1]), np.array([3])])
    assert q.pop(1000).tolist() == [1] and q.pop(1000).tolist() == [3]
    assert q.pop(token_budget=20).tolist() == [2]  # the budget shrank: one row of 20
    assert q.pop(token_budget=1000).tolist() == [0]
    assert not q
    assert plan_microbatches([], token_budget=100, max_rows=8) == []


def test_a_retry_that_fails_again_runs_its_pieces_before_older_retries():
    q = MicroBatchQueue([5] * 8, max_rows=8)
    first = q.pop(token_budget=100)
    q.retry_first([first[:4], first[4:]])
    failed = q.pop(100)
    q.retry_first([failed[:2], failed[2:]])
    assert [b.tolist() for b in (q.pop(100), q.pop(100), q.pop(100))] == [[0, 1], [2, 3], [4, 5, 6, 7]]
    assert not q


def test_budget_halves_on_oom_and_stops_at_floor():
    b = TokenBudget(1024, 4096, 0.1, minimum=256)
    assert b.on_oom(1024) and b.value == 512
    assert b.on_oom(512) and b.value == 256
    assert not b.on_oom(256)


def test_budget_never_grows_back_to_a_size_that_ran_out_of_memory():
    b = TokenBudget(1024, 4096, latency_target_s=1.0)
    assert b.on_oom(1000) and b.value == 512
    for _ in range(20):
        b.observe(tokens=b.value, seconds=0.01)
    assert b.value == 800  # one growth step (x1.25) below the failed size


def test_budget_grows_when_fast_and_full_and_shrinks_when_slow():
    b = TokenBudget(1000, 2000, latency_target_s=1.0)
    b.observe(tokens=1000, seconds=0.1)
    assert b.value == 1250
    b.observe(tokens=100, seconds=0.1)  # a small batch says nothing about a bigger one
    assert b.value == 1250
    b.observe(tokens=1250, seconds=3.0)
    assert b.value == 1000
    for _ in range(20):
        b.observe(tokens=b.value, seconds=0.01)
    assert b.value == 2000
