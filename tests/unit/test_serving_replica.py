"""One replica's engine without Ray or HTTP: real tiny early-exit model behind the request queue.

Early release is made observable with a Predictor subclass whose layers after the first are slow: a text
that exits at ramp 1 must be answered long before the text that shares its batch and runs to the end.
"""
import asyncio
import time

import numpy as np
import pytest

from pipeline.config import EngineConfig
from pipeline.engine.predictor import Predictor, shadow_mask
from pipeline.feedback import FeedbackWindow
from pipeline.serving.config import ServeAppConfig
from pipeline.serving.replica import ReplicaEngine

CANDIDATES = ["a fine film", "dull", "one of the best movies of the year, truly moving", "meh",
              "not good at all", "an utter mess", "charming and sharp", "I walked out"]


class SlowTail(Predictor):
    """Every layer after the first sleeps `delay_s`: ramp-1 exits happen long before the batch ends."""

    delay_s = 0.15

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        layer = self.model.layer

        def slow(i, h, mask):
            if i >= 1:
                time.sleep(self.delay_s)
            return layer(i, h, mask)

        self.model.layer = slow


def ramp1_split(artifact):
    """(text exiting at ramp 1, text running to the end, thresholds) for the tiny model."""
    p = Predictor(artifact, EngineConfig(mode="release", thresholds=[1.0, 1.0, 1.0]))
    out = p.predict(CANDIDATES)
    conf = np.empty(len(CANDIDATES))
    conf[out.feedback_rows] = out.feedback.conf[:, 0]
    hi, lo = int(conf.argmax()), int(conf.argmin())
    assert conf[hi] > conf[lo]
    return CANDIDATES[hi], CANDIDATES[lo], [float(conf[hi] + conf[lo]) / 2, 1.0, 1.0]


def app_config(artifact, thresholds=None, predictor_class="pipeline.engine.predictor:Predictor", **batching):
    return ServeAppConfig(
        model=artifact,
        engine={"thresholds": thresholds, "token_budget": 4096},
        controller={"enabled": False},
        batching={"batch_wait_timeout_s": 0.0, **batching},
        predictor_class=predictor_class,
    )


def test_release_mode_is_the_default_and_import_paths_are_checked(tiny_artifact):
    assert ServeAppConfig(model="x").engine.mode == "release"
    assert ServeAppConfig(model="x", engine={"num_threads": 1}).engine.mode == "release"
    assert ServeAppConfig(model="x", engine={"mode": "exit"}).engine.mode == "exit"
    with pytest.raises(ValueError, match="predictor_class"):
        ServeAppConfig(model="x", predictor_class="no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        ReplicaEngine(app_config(tiny_artifact, predictor_class="pipeline.nothing:Here"))


def test_a_ramp1_exit_is_answered_before_its_batch_finishes(tiny_artifact):
    early, late, thresholds = ramp1_split(tiny_artifact)
    eng = ReplicaEngine(app_config(tiny_artifact, thresholds, predictor_class=f"{__name__}:SlowTail"))
    reference = Predictor(tiny_artifact, EngineConfig(mode="release", thresholds=thresholds)).predict([early, late])

    async def main():
        t0 = time.monotonic()
        when = {}

        async def ask(text):
            out = await eng.predict(eng.encode([text]), [text])
            when[text] = time.monotonic() - t0
            return out[0]

        a, b = await asyncio.gather(ask(early), ask(late))  # queued together -> one batch
        await eng.close()
        return a, b, when

    a, b, when = asyncio.run(main())
    assert a.exit_layer == 1 and b.exit_layer == 4
    assert [a.label, b.label] == [p.label for p in reference.predictions]
    assert eng.queue.batches == 1
    assert when[late] - when[early] > 2 * SlowTail.delay_s  # answered ~3 slow layers earlier
    text = eng.metrics_text().decode()
    assert any(line.startswith("offramp_exits_total{") and 'layer="1"' in line for line in text.splitlines())
    assert "offramp_release_lead_seconds_count" in text


class FakeClient:
    """ControllerClient stand-in: records reports; after the first one, hands out version 1 thresholds."""

    def __init__(self, thresholds, fail=False, feedback_fraction=0.0):
        self.reports, self.fail = [], fail
        self.version, self.thresholds, self.active = 0, None, None
        self._next = np.asarray(thresholds)
        self.feedback_fraction = feedback_fraction
        self.answered = 0

    def report(self, window, output_rows=0):
        if self.fail:
            raise ConnectionError("controller unreachable")
        self.reports.append(window)
        self.answered += output_rows
        return True

    def maybe_refresh(self):
        if self.fail:
            raise ConnectionError("controller unreachable")
        if self.reports and self.version == 0:
            self.version, self.thresholds, self.active = 1, self._next, np.ones(len(self._next), bool)
        return True

    def stats(self):
        return {"version": self.version, "reports_failed": 0, "refresh_failures": 0}

    from pipeline.control.client import ControllerClient

    refresh_policy = ControllerClient.refresh_policy  # the real swap, over this stand-in's state


def _ask_many(eng, texts):
    async def main():
        outs = []
        for t in texts:
            outs.append((await eng.predict(eng.encode([t]), [t]))[0])
            await asyncio.sleep(0.05)  # let the controller thread run between batches
        await eng.close()
        return outs

    return asyncio.run(main())


def test_feedback_reaches_the_controller_and_new_thresholds_are_used(tiny_artifact):
    client = FakeClient([0.0, 1.0, 1.0])  # version 1 opens ramp 1 for everything
    eng = ReplicaEngine(app_config(tiny_artifact, [1.0, 1.0, 1.0]), client=client)
    outs = _ask_many(eng, CANDIDATES[:4])
    assert client.reports and all(isinstance(w, FeedbackWindow) for w in client.reports)
    assert sum(len(w) for w in client.reports) >= 1  # release mode: every row is feedback
    assert outs[0].exit_layer == 4  # before the update: all ramps closed
    assert eng.predictor.policy.version == 1 and outs[-1].exit_layer == 1
    assert eng.health()["threshold_version"] == 1


def test_exit_mode_feeds_back_the_share_the_controller_asks_for_and_counts_answers(tiny_artifact):
    """Online exit mode has sparse feedback: the controller's feedback_fraction raises the shadow share, and
    reports say how many texts were answered, so its windows close on answers, not feedback rows."""
    cfg = app_config(tiny_artifact, [1.0, 1.0, 1.0])
    cfg = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"mode": "exit", "shadow_fraction": 0.0})})
    for share, expect_all in ((1.0, True), (0.0, False)):
        client = FakeClient([1.0, 1.0, 1.0], feedback_fraction=share)
        eng = ReplicaEngine(cfg, client=client)
        _ask_many(eng, CANDIDATES[:4])
        fed = sum(len(w) for w in client.reports)
        assert fed == (4 if expect_all else 0)
        assert client.answered == (4 if expect_all else 0)  # answers travel with the next feedback


def test_a_dead_controller_never_stops_serving(tiny_artifact):
    client = FakeClient([0.0, 1.0, 1.0], fail=True)
    eng = ReplicaEngine(app_config(tiny_artifact, [1.0, 1.0, 1.0]), client=client)
    outs = _ask_many(eng, CANDIDATES[:3])
    assert all(o.error is None and o.exit_layer == 4 for o in outs)
    assert eng.predictor.policy.version == 0


def _metric(eng, name, **labels):
    want = [f'{k}="{v}"' for k, v in labels.items()]
    lines = [x for x in eng.metrics_text().decode().splitlines() if x.startswith(name + "{")]
    return sum(float(x.split()[-1]) for x in lines if all(w in x for w in want))


async def _until(cond, timeout_s=10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        await asyncio.sleep(0.02)


def test_release_tails_run_to_the_end_when_idle_and_stop_when_a_text_arrives(tiny_artifact):
    """Release mode: texts answered at a ramp leave the batch's hot path; once no text waits, the replica
    runs them to the end and reports the batch's feedback, so every text becomes feedback. A text that
    arrives meanwhile drops the tail, and then the batch's non-shadow texts give none (a dropped tail
    must not leave only the texts no ramp answered in the controller's windows)."""
    early, late, thresholds = ramp1_split(tiny_artifact)
    client = FakeClient(thresholds)  # version 1 = the same thresholds
    eng = ReplicaEngine(app_config(tiny_artifact, thresholds, predictor_class=f"{__name__}:SlowTail"), client=client)
    keys = ["k0", "k1", "k2"]
    shadow = shadow_mask(keys + ["k4", "k5", "k6"], eng.predictor.config.shadow_fraction)

    async def main():
        first = await asyncio.gather(*[eng.predict(eng.encode([t]), [k]) for t, k in zip([early, late, early], keys)])
        assert shadow.tolist() == [False] * 5 + [True]  # only k6 is a shadow row
        await _until(lambda: _metric(eng, "offramp_release_tail_rows_total", outcome="finished") == 3)
        assert _metric(eng, "offramp_feedback_rows_total") == 3  # every text, reported once the tail ran
        await _until(lambda: sum(len(w) for w in client.reports) == 3)  # sent without waiting for a batch
        # A tail still running when a text arrives stops at the next layer and gives no feedback.
        await asyncio.gather(eng.predict(eng.encode([early]), ["k4"]), eng.predict(eng.encode([late]), ["k5"]))
        await asyncio.sleep(SlowTail.delay_s / 2)  # the tail of "k4" is on its first slow layer
        t0 = time.monotonic()
        await eng.predict(eng.encode([early]), ["k6"])
        waited = time.monotonic() - t0
        await _until(lambda: _metric(eng, "offramp_release_tail_rows_total", outcome="dropped") == 2)
        await _until(lambda: sum(len(w) for w in client.reports) == 4)  # k6, a shadow row, with its batch
        await asyncio.sleep(0.2)
        assert sum(len(w) for w in client.reports) == 4  # k4 and k5 (its batch-mate) gave no feedback
        assert _metric(eng, "offramp_release_tail_rows_total", outcome="finished") == 3
        await eng.close()
        return first, waited

    first, waited = asyncio.run(main())
    assert [o[0].exit_layer for o in first] == [1, 4, 1]
    assert waited < 2 * SlowTail.delay_s  # k6 waited for one tail layer at most, not the whole tail (3 layers)


def test_a_request_picks_the_truncation_side_and_errors_can_name_the_full_length(tiny_artifact):
    """TEI's truncation_direction: a long text is cut on the side the request names (default: the tokenizer's)."""
    eng = ReplicaEngine(app_config(tiny_artifact))
    long = " ".join(f"w{i}" for i in range(300))
    default, right, left = eng.encode([long]), eng.encode([long], "right"), eng.encode([long], "left")
    limit = eng.predictor.max_length
    assert all(e.truncated[0] and len(e.input_ids[0]) == limit for e in (default, right, left))
    assert default.input_ids[0] == right.input_ids[0] != left.input_ids[0]
    full = eng.predictor.tokenizer(long)["input_ids"]
    assert left.input_ids[0][1:-1] == full[-(limit - 1):-1]  # the end of the text kept
    assert eng.token_count(long) == len(full) > limit
    asyncio.run(eng.close())
