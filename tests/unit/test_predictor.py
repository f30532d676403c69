"""The worker-side engine: one result per input, in order, bad rows flagged, no row lost."""
import numpy as np
import pytest
import torch

from pipeline.config import EngineConfig
from pipeline.engine import predictor as predictor_mod
from pipeline.engine.policy import ExitPolicy
from pipeline.engine.predictor import Predictor, shadow_mask

TEXTS = ["a fine film", "dull", "one of the best movies of the year, truly moving", "meh", "not good at all"] * 8


def test_one_result_per_input_in_order_matching_unsorted_runs(tiny_artifact):
    p = Predictor(tiny_artifact, EngineConfig(token_budget=64, max_batch_rows=4))
    out = p.predict(TEXTS)
    assert len(out.predictions) == len(TEXTS)
    # the same text always gets the same answer wherever the sort put it
    for i, t in enumerate(TEXTS):
        j = TEXTS.index(t)
        assert out.predictions[i].label == out.predictions[j].label
        assert out.predictions[i].exit_layer == out.predictions[j].exit_layer
    # one big batch gives the same answers as many small ones
    big = Predictor(tiny_artifact, EngineConfig(token_budget=65536, max_token_budget=65536)).predict(TEXTS)
    assert [x.label for x in big.predictions] == [x.label for x in out.predictions]
    assert [x.exit_layer for x in big.predictions] == [x.exit_layer for x in out.predictions]


def test_bad_rows_are_reported_not_dropped(tiny_artifact):
    p = Predictor(tiny_artifact)
    texts = ["good", None, "", "   ", 42, "bad"]
    out = p.predict(texts)
    errors = [x.error for x in out.predictions]
    assert errors[0] is None and errors[5] is None
    assert "null" in errors[1]
    assert "empty" in errors[2] and "empty" in errors[3]
    assert "int" in errors[4]
    assert out.stats["errors"] == 4


def test_long_text_is_truncated_and_flagged(tiny_artifact):
    p = Predictor(tiny_artifact, EngineConfig(max_length=32))
    out = p.predict(["word " * 100, "short text"])
    assert out.predictions[0].truncated and out.predictions[0].error is None
    assert not out.predictions[1].truncated


def test_cuda_oom_halves_budget_and_loses_no_row(tiny_artifact, monkeypatch):
    p = Predictor(tiny_artifact, EngineConfig(token_budget=4096, max_batch_rows=64))
    expected = [x.label for x in p.predict(TEXTS).predictions]
    real = predictor_mod.execute
    calls, failed_tokens = [], []

    def flaky(model, ids, mask, *a, **k):
        calls.append(ids.shape[0])
        if ids.shape[0] > 8:
            failed_tokens.append(ids.numel())
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, mask, *a, **k)

    monkeypatch.setattr(predictor_mod, "execute", flaky)
    out = p.predict(TEXTS)
    assert [x.label for x in out.predictions] == expected
    assert all(x.error is None for x in out.predictions)
    assert calls[0] == len(TEXTS) and p.budget.ooms == len(failed_tokens) >= 1
    assert sum(c for c in calls if c <= 8) == len(TEXTS)  # every row ran once, in a pass that succeeded
    for _ in range(50):  # fast, full passes do not grow the budget back to a size that failed
        p.budget.observe(p.budget.value, 0.0)
    assert p.budget.value < min(failed_tokens)


def test_on_result_fires_once_per_row_when_an_oom_retry_reruns_announced_rows(tiny_artifact, monkeypatch):
    p = Predictor(tiny_artifact, EngineConfig(token_budget=4096, max_batch_rows=64))
    p.set_policy(ExitPolicy(np.zeros(p.num_ramps), np.ones(p.num_ramps, bool)))  # every row exits at ramp 1
    real = predictor_mod.execute
    failed = []

    def exits_then_oom(model, ids, mask, *a, **k):
        res = real(model, ids, mask, *a, **k)  # announces every row at the first ramp (threshold 0)
        if not failed:
            failed.append(ids.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated, at a later layer)")
        return res

    monkeypatch.setattr(predictor_mod, "execute", exits_then_oom)
    seen = []
    out = p.predict(TEXTS, on_result=lambda i, pred: seen.append((i, pred)))
    assert failed == [len(TEXTS)]
    assert sorted(i for i, _ in seen) == list(range(len(TEXTS)))
    assert all(out.predictions[i] is pred for i, pred in seen)  # the output is what each row was told
    assert all(x.error is None for x in out.predictions)
    assert {x.exit_layer for x in out.predictions} == {p.model.ramps.layers[0]}


def test_budget_change_within_a_call_sizes_the_rest_of_that_call(tiny_artifact, monkeypatch):
    # A slow micro-batch shrinks the budget; the same call's later micro-batches must be cut at the new
    # budget, not at the one the call started with (offline, one call is a whole 1,024-row shard).
    p = Predictor(tiny_artifact, EngineConfig(token_budget=4096, max_batch_rows=8))
    expected = [x.label for x in p.predict(TEXTS).predictions]
    monkeypatch.setattr(p.budget, "observe", lambda tokens, seconds: None)  # only the stub below moves it
    real = predictor_mod.execute
    rows = []

    def slow_first(model, ids, *a, **k):
        rows.append(ids.shape[0])
        p.budget.value = 1  # as if this pass had been far over the latency target
        return real(model, ids, *a, **k)

    monkeypatch.setattr(predictor_mod, "execute", slow_first)
    out = p.predict(TEXTS)
    assert rows == [8] + [1] * (len(TEXTS) - 8)
    assert [x.label for x in out.predictions] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_attention_skips_cudnn_which_plans_every_new_shape(tiny_artifact):
    from torch.profiler import ProfilerActivity, profile

    p = Predictor(tiny_artifact, EngineConfig(device="cuda", token_budget=64, max_batch_rows=4))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = p.predict(TEXTS)
    ops = {e.key for e in prof.key_averages()}
    assert any("scaled_dot_product" in op for op in ops), "the layers should run SDPA"
    assert not any("cudnn_attention" in op for op in ops), sorted(op for op in ops if "attention" in op)
    assert all(x.error is None for x in out.predictions)


def test_failed_batch_reports_every_row(tiny_artifact, monkeypatch):
    p = Predictor(tiny_artifact)

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(predictor_mod, "execute", broken)
    out = p.predict(["a", "b", "c"])
    assert all("kernel exploded" in x.error for x in out.predictions)


def test_feedback_is_shadow_rows_in_exit_mode_and_all_rows_in_release(tiny_artifact):
    texts = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(200)]
    ex = Predictor(tiny_artifact, EngineConfig(shadow_fraction=0.1)).predict(texts)
    assert 5 <= len(ex.feedback) <= 40
    rel = Predictor(tiny_artifact, EngineConfig(mode="release")).predict(texts)
    assert len(rel.feedback) == 200
    assert [x.label for x in ex.predictions] == [x.label for x in rel.predictions]


def test_shadow_choice_is_deterministic_and_near_the_fraction():
    keys = list(range(20000))
    a, b = shadow_mask(keys, 0.05), shadow_mask(keys, 0.05)
    assert np.array_equal(a, b)
    assert 0.04 < a.mean() < 0.06
    assert not shadow_mask(keys, 0).any() and shadow_mask(keys, 1).all()


def test_threshold_override_must_match_ramps(tiny_artifact):
    with pytest.raises(ValueError, match="thresholds"):
        Predictor(tiny_artifact, EngineConfig(thresholds=[0.5]))


def test_on_result_fires_once_per_row_and_ramp_exits_come_before_the_batch_ends(tiny_artifact):
    p = Predictor(tiny_artifact, EngineConfig(mode="release"))
    texts = TEXTS + [None]
    events = []
    out = p.predict(texts, on_result=lambda i, pred: events.append((i, pred.exit_layer)))
    assert sorted(i for i, _ in events) == list(range(len(texts)))
    for i, layer in events:
        assert out.predictions[i].exit_layer == layer
    L = p.model.num_layers
    early = [k for k, (_, layer) in enumerate(events) if 0 < layer < L]
    late = [k for k, (_, layer) in enumerate(events) if layer == L]
    if early and late:  # in one batch, every early answer is announced before any final one
        assert min(early) < max(late)


def test_feedback_rows_point_at_the_rows_that_ran_to_the_end(tiny_artifact):
    texts = [f"review {i}: {'great' if i % 3 else 'poor'} acting" for i in range(120)]
    p = Predictor(tiny_artifact, EngineConfig(shadow_fraction=0.2, token_budget=256, max_batch_rows=16))
    out = p.predict(texts)
    rel = Predictor(tiny_artifact, EngineConfig(mode="release")).predict(texts)
    # the final prediction recorded for feedback row k is the release run's final for that caller row
    final_by_row = dict(zip(rel.feedback_rows.tolist(), rel.feedback.final.tolist()))
    assert len(out.feedback_rows) == len(out.feedback) > 0
    for k, i in enumerate(out.feedback_rows.tolist()):
        assert out.feedback.final[k] == final_by_row[i]
    agree, total = rel.shadow_agreement()
    assert total == 120 and 0 <= agree <= 120


def test_a_bf16_predictor_measures_agreement_against_the_float_original(tiny_artifact):
    from pipeline.data.datasets import load_dataset

    texts = list(load_dataset("movie-reviews").texts[:120])
    keys = [str(i) for i in range(len(texts))]
    fp32 = Predictor(tiny_artifact, EngineConfig(dtype="float32"), reference=True)
    assert fp32.exact and fp32.reference is None  # the float original needs no second copy
    enc = fp32.encoder.encode(texts)
    truth = [p.label_id for p in fp32.record_encoded(enc, keys).predictions]

    own = Predictor(tiny_artifact, EngineConfig(dtype="bfloat16"))
    bf = Predictor(tiny_artifact, EngineConfig(dtype="bfloat16"), reference=True)
    assert not bf.exact and bf.reference is not None
    rec = bf.record_encoded(enc, keys)
    # every row answered by the float original, and recorded with the bf16 model's own ramps and head
    assert [p.label_id for p in rec.predictions] == truth
    order = np.argsort(rec.feedback_rows)
    assert rec.feedback.take(order).reference.tolist() == truth
    assert rec.feedback.take(order).final.tolist() == [p.label_id for p in own.record_encoded(enc, keys).predictions]
    assert rec.stats["reference_seconds"] > 0

    shadow = np.arange(len(texts)) % 3 == 0
    out = bf.predict_encoded(enc, keys, shadow=shadow)  # exit mode: feedback rows get the original's answer
    assert sorted(out.feedback_rows.tolist()) == np.flatnonzero(shadow).tolist()
    assert out.feedback.reference.tolist() == [truth[i] for i in out.feedback_rows.tolist()]
    with pytest.raises(ValueError, match="deferred"):
        bf.predict_encoded(enc, keys, mode="release", defer_tail=True)


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_is_bfloat16_on_a_fast_bf16_cpu_only_where_its_loss_is_measured(monkeypatch, fast):
    monkeypatch.setattr(predictor_mod, "fast_bf16_cpu", lambda: fast)
    cpu = torch.device("cpu")
    assert predictor_mod.resolve_dtype("auto", cpu, measured=True)[0] == (torch.bfloat16 if fast else torch.float32)
    assert predictor_mod.resolve_dtype("auto", cpu, measured=False)[0] == torch.float32  # Serve, predict: float32
    assert predictor_mod.resolve_dtype("float32", cpu, measured=True) == (torch.float32, "engine.dtype")
    assert predictor_mod.resolve_dtype("auto", torch.device("cuda"), half="bfloat16")[0] == torch.bfloat16


def test_shape_multiple_rides_along_only_where_new_shapes_cost(tiny_artifact):
    """Default: exact shapes in float32 eager on a CPU (ride-along rows cost more there), multiples of 8 in
    bfloat16 (oneDNN pays for every new shape); the float original taking over a bf16 job runs exact shapes."""
    seqs = [[101, 7, 8, 9, 102], [101, 7, 102]]
    fp32 = Predictor(tiny_artifact, EngineConfig(dtype="float32"))
    bf = Predictor(tiny_artifact, EngineConfig(dtype="bfloat16"), reference=True)
    fixed = Predictor(tiny_artifact, EngineConfig(dtype="float32", shape_multiple=4))
    assert (fp32.shape_multiple, bf.shape_multiple, fixed.shape_multiple) == (1, 8, 4)
    assert fp32._pad(seqs)[0].shape == (2, 5) and bf._pad(seqs)[0].shape == (2, 8)
    assert fixed._pad(seqs)[0].shape == (2, 8)
    bf.use_original()
    assert bf.shape_multiple == 1 and bf._pad(seqs)[0].shape == (2, 5)
