"""The online endpoint for real: Ray Serve over HTTP on 127.0.0.1, a tiny early-exit artifact.

Two applications are deployed once for the module from one Ray Serve config file (the same path as
`offramp serve`): `main` (two replicas, the stock Predictor, a shared controller) and `hooks` (one
replica hosting HookedPredictor below, which makes batches slow or fail on request, so early release,
overload and batch failure can be observed deterministically).
"""
from __future__ import annotations

import json
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml

from pipeline.bench.online_bench import _settle
from pipeline.config import EngineConfig
from pipeline.engine.predictor import Predictor

NAMESPACE = "offramp-tests"
SLOW_S = 0.3  # per layer after the first, in a batch holding a "slow:" text


class HookedPredictor(Predictor):
    """Test hooks keyed by text: a batch holding a text that starts with `slow:` runs every layer after
    the first `SLOW_S` slower; a batch holding one that starts with `fail:` raises. Imported by the
    replica through `predictor_class`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slow = False
        layer = self.model.layer

        def hooked(i, h, mask):
            if i >= 1 and self._slow:
                time.sleep(SLOW_S)
            return layer(i, h, mask)

        self.model.layer = hooked

    def predict_encoded(self, encoded, keys, mode=None, on_result=None, **kwargs):
        if any(str(k).startswith("fail:") for k in keys):
            raise RuntimeError("injected batch failure")
        self._slow = any(str(k).startswith("slow:") for k in keys)
        return super().predict_encoded(encoded, keys, mode, on_result, **kwargs)


TEXTS = ["a fine film", "dull", "one of the best movies of the year, truly moving", "meh", "not good at all",
         "an utter mess", "charming and sharp", "I walked out", "a quiet triumph", "too long by half"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(artifact):
    """(plain text exiting at ramp 1, `slow:` text running to the end, ramp thresholds) for the tiny model."""
    cands = TEXTS + [f"slow: {t}" for t in TEXTS]
    p = Predictor(artifact, EngineConfig(mode="release", thresholds=[1.0, 1.0, 1.0]))
    out = p.predict(cands)
    conf = np.empty(len(cands))
    conf[out.feedback_rows] = out.feedback.conf[:, 0]
    plain, slow = conf[: len(TEXTS)], conf[len(TEXTS):]
    a, b = int(plain.argmax()), int(slow.argmin())
    assert plain[a] > slow[b], "tiny model: no ramp-1 confidence split between plain and slow texts"
    return TEXTS[a], f"slow: {TEXTS[b]}", [float(plain[a] + slow[b]) / 2, 1.0, 1.0]


@pytest.fixture(scope="module")
def serve_env(ray_session, tiny_artifact, tmp_path_factory):
    from ray import serve

    from pipeline.commands.serve import deploy

    early, late, thresholds = _split(tiny_artifact)
    controller = f"ctl-serve-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    deployment = {"name": "EarlyExitDeployment", "max_ongoing_requests": 64}
    config = {
        "http_options": {"port": port},  # host: offramp serve binds 127.0.0.1 by default
        "applications": [
            {"name": "main", "route_prefix": "/main", "import_path": "pipeline.serving.app:app_builder",
             "args": {"model": tiny_artifact,
                      # no warm start: the answers stay those of the manifest's thresholds until a window fills
                      "controller": {"name": controller, "namespace": NAMESPACE, "refresh_every_batches": 2,
                                     "warm_start": False},
                      "batching": {"max_items_per_request": 8, "max_body_bytes": 4096, "max_queue": 64}},
             "deployments": [{**deployment, "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}]},
            {"name": "hooks", "route_prefix": "/hooks", "import_path": "pipeline.serving.app:app_builder",
             "args": {"model": tiny_artifact, "engine": {"thresholds": thresholds},
                      "controller": {"enabled": False},
                      "predictor_class": "tests.integration.test_serve:HookedPredictor",
                      "batching": {"max_queue": 4, "max_items_per_request": 4, "max_batch_size": 8,
                                   "batch_wait_timeout_s": 0.0}},
             "deployments": [{**deployment, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}}]},
        ],
    }
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    t = time.monotonic()
    urls = deploy(str(path), timeout_s=180, echo=lambda *_: None)
    print(f"deployed in {time.monotonic() - t:.1f} s: {urls}")
    env = {"main": urls[0], "hooks": urls[1], "early": early, "late": late, "thresholds": thresholds,
           "controller": controller, "artifact": tiny_artifact}
    yield env
    serve.shutdown()
    try:
        ray_session.kill(ray_session.get_actor(controller, namespace=NAMESPACE), no_restart=True)
    except Exception:
        pass


def post(url, payload, timeout=30, **kw):
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return requests.post(f"{url}/predict", data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout, **kw)


def test_concurrent_clients_get_one_correct_answer_each(serve_env):
    url = serve_env["main"]
    ref = Predictor(serve_env["artifact"], EngineConfig(mode="release")).predict(TEXTS).predictions
    expected = {t: (p.label, p.exit_layer, p.score) for t, p in zip(TEXTS, ref)}
    jobs = [TEXTS[i % len(TEXTS)] for i in range(30)] + [TEXTS[i: i + 3] for i in range(0, 8)]

    def ask(inputs):
        r = post(url, {"inputs": inputs})
        return inputs, r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, jobs))
    for inputs, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        if isinstance(inputs, str):  # one text -> [{label, score, exit_layer}]
            assert isinstance(body, list) and len(body) == 1 and set(body[0]) == {"label", "score", "exit_layer"}
            rows, texts = [body], [inputs]
        else:  # a batch -> one single-element list per text, in order
            assert len(body) == len(inputs)
            rows, texts = body, inputs
        for text, row in zip(texts, rows):
            label, layer, score = expected[text]
            assert (row[0]["label"], row[0]["exit_layer"]) == (label, layer), text
            assert row[0]["score"] == pytest.approx(score, abs=1e-4)


def test_two_replicas_both_answer(serve_env):
    url = serve_env["main"]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda t: post(url, {"inputs": t}), TEXTS * 4))
    assert all(r.status_code == 200 for r in rs)
    replicas = {r.headers["X-Offramp-Replica"] for r in rs}
    assert len(replicas) == 2, replicas


def test_bad_requests_get_4xx_with_a_message_and_the_replica_survives(serve_env):
    url = serve_env["main"]
    cases = [
        (b'{"inputs": "unterminated', 400, "not valid JSON"),
        ({"texts": "wrong key"}, 422, "unknown field"),
        ({}, 422, 'missing "inputs"'),
        ({"inputs": ""}, 422, "empty"),
        ({"inputs": []}, 422, "empty list"),
        ({"inputs": ["fine", 7]}, 422, '"inputs"[1]'),
        ({"inputs": ["t"] * 9}, 422, "limit is 8"),
        ({"inputs": "word " * 2000}, 413, "max_body_bytes"),
    ]
    for payload, status, words in cases:
        r = post(url, payload)
        assert r.status_code == status, (payload if isinstance(payload, bytes) else str(payload)[:60], r.text)
        body = r.json()
        assert words in body["error"] and body["error_type"] == "Validation", body
    assert requests.get(f"{url}/predict", timeout=10).status_code == 405
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert post(url, {"inputs": "still fine"}).status_code == 200


def _timed_post(url, inputs, t0):
    r = post(url, {"inputs": inputs})
    return r, time.monotonic() - t0


def test_a_ramp1_exit_is_answered_before_its_batch_finishes(serve_env):
    url, early, late = serve_env["hooks"], serve_env["early"], serve_env["late"]
    _settle(url)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(_timed_post, url, late, t0)  # no ramp answers it: ~1 s of slow layers
        time.sleep(0.15)  # `busy` is running (its slow layers take ~1 s); the next two queue together
        b = pool.submit(_timed_post, url, late, t0)
        time.sleep(0.05)
        a = pool.submit(_timed_post, url, early, t0)
        (ra, ta), (rb, tb), (rbusy, _) = a.result(), b.result(), busy.result()
    assert ra.status_code == rb.status_code == rbusy.status_code == 200
    assert ra.json()[0]["exit_layer"] == 1 and rb.json()[0]["exit_layer"] == 4
    # same batch: `late` keeps the batch's later layers slow (3 x SLOW_S); `early` left after layer 1
    assert tb - ta > 2 * SLOW_S, (ta, tb)
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    lead = [line for line in metrics.splitlines() if line.startswith("offramp_release_lead_seconds_sum")]
    assert lead and float(lead[0].split()[-1]) > 2 * SLOW_S


def test_overload_gets_503_with_retry_after_at_once_then_recovers(serve_env):
    url = serve_env["hooks"]
    _settle(url)  # earlier tests' release tails (slow layers here) would delay `busy` by up to a layer
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(post, url, {"inputs": serve_env["late"]})  # ~1 s of slow layers
        time.sleep(0.15)
        full = pool.submit(post, url, {"inputs": ["q1", "q2", "q3", "q4"]})  # fills max_queue=4
        time.sleep(0.15)
        t = time.monotonic()
        r = post(url, {"inputs": "one too many"})
        took = time.monotonic() - t
        assert busy.result().status_code == 200 and full.result().status_code == 200
    assert r.status_code == 503, r.text
    assert int(r.headers["Retry-After"]) >= 1 and r.json()["error_type"] == "Overloaded"
    assert took < 0.5  # refused at once, not after the queue drained
    assert post(url, {"inputs": "calm again"}).status_code == 200
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert any(line.startswith("offramp_overload_rejections_total") and not line.endswith(" 0.0")
               for line in metrics.splitlines())


def test_a_failing_batch_fails_every_request_in_it_and_none_hangs(serve_env):
    url = serve_env["hooks"]
    _settle(url)
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(post, url, {"inputs": serve_env["late"]})  # ~1 s of slow layers
        time.sleep(0.15)
        bad = pool.submit(post, url, {"inputs": "fail: this batch"}, 20)
        time.sleep(0.05)
        mate = pool.submit(post, url, {"inputs": ["an innocent", "batch-mate"]}, 20)
        rb, rm = bad.result(), mate.result()  # requests' timeout: a hang fails the test
        assert busy.result().status_code == 200
    for r in (rb, rm):
        assert r.status_code == 500 and r.json()["error_type"] == "Backend"
        assert "injected batch failure" in r.json()["error"]
    assert post(url, {"inputs": "after the failure"}).status_code == 200


def test_health_and_metrics(serve_env):
    url = serve_env["main"]
    h = requests.get(f"{url}/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["mode"] == "release"
    assert h.json()["compression"] == "none"  # what the replica runs (a skipped method says why)
    m = requests.get(f"{url}/metrics", timeout=10)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    for name in ("offramp_requests_total", "offramp_request_latency_seconds_bucket", "offramp_exits_total",
                 "offramp_realized_agreement", "offramp_threshold_version", "offramp_queue_texts",
                 "offramp_overload_rejections_total", "offramp_batch_texts_bucket"):
        assert name in m.text, name


def test_controller_gets_feedback_and_replicas_outlive_it(serve_env, ray_session):
    ray = ray_session
    url, name = serve_env["main"], serve_env["controller"]
    handle = ray.get_actor(name, namespace=NAMESPACE)
    for t in TEXTS:
        assert post(url, {"inputs": t}).status_code == 200
    deadline = time.monotonic() + 20
    while ray.get(handle.get_state.remote(), timeout=10)["rows"] == 0:
        assert time.monotonic() < deadline, "no feedback reached the controller"
        time.sleep(0.2)
    before = [post(url, {"inputs": t}).json() for t in TEXTS]
    ray.kill(handle, no_restart=True)
    time.sleep(0.5)
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda t: post(url, {"inputs": t}), TEXTS * 2))
    assert all(r.status_code == 200 for r in after)
    # Last thresholds kept: the same answers (scores up to float rounding: concurrent texts share batches).
    for got, want in zip([r.json() for r in after[: len(TEXTS)]], before):
        assert [{**x, "score": pytest.approx(x["score"], abs=1e-4)} for x in want] == got
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
