"""The online endpoint for real: Ray Serve over HTTP on 127.0.0.1, a tiny early-exit artifact, real clients
(huggingface_hub's InferenceClient, requests, prometheus_client's parser) speaking TEI's protocol.

Two applications are deployed once for the module from one Ray Serve config file (the same path as
`offramp serve`): `main` (two replicas, the stock Predictor, a shared controller) and `hooks` (one
replica hosting HookedPredictor below, which makes batches slow or fail on request, so early release,
overload and batch failure can be observed deterministically). Their replicas export Ray metrics every
second (RAY_metrics_report_interval_ms, 10 s by default), so whole-app /metrics settles in seconds.
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
from prometheus_client.parser import text_string_to_metric_families

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
    actor = {"num_cpus": 0.25, "runtime_env": {"env_vars": {"RAY_metrics_report_interval_ms": "1000"}}}
    deployment = {"name": "EarlyExitDeployment", "max_ongoing_requests": 64, "ray_actor_options": actor}
    config = {
        "http_options": {"port": port},  # host: offramp serve binds 127.0.0.1 by default
        "applications": [
            {"name": "main", "route_prefix": "/main", "import_path": "pipeline.serving.app:app_builder",
             "args": {"model": tiny_artifact,
                      # no warm start: the answers stay those of the manifest's thresholds until a window fills
                      "controller": {"name": controller, "namespace": NAMESPACE, "refresh_every_batches": 2,
                                     "warm_start": False},
                      "batching": {"max_items_per_request": 8, "max_body_bytes": 4096, "max_queue": 64}},
             "deployments": [{**deployment, "num_replicas": 2}]},
            {"name": "hooks", "route_prefix": "/hooks", "import_path": "pipeline.serving.app:app_builder",
             "args": {"model": tiny_artifact, "engine": {"thresholds": thresholds},
                      "controller": {"enabled": False},
                      "predictor_class": "tests.integration.test_serve:HookedPredictor",
                      "batching": {"max_queue": 4, "max_items_per_request": 4, "max_batch_size": 8,
                                   "batch_wait_timeout_s": 0.0}},
             "deployments": [{**deployment, "num_replicas": 1}]},
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


def post(url, payload, timeout=30, path="/predict", **kw):
    data = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return requests.post(f"{url}{path}", data=data, headers={"Content-Type": "application/json"},
                         timeout=timeout, **kw)


def _until(cond, timeout_s=30.0, every_s=0.2, what="condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


def _running(url) -> bool:
    return bool(requests.get(f"{url}/health", timeout=10).json()["running"])


def _scrape(url) -> dict:
    """GET /metrics parsed by prometheus_client's text parser: {family name: Metric}."""
    r = requests.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def _samples(fams, sample_name, **labels):
    fam = fams.get(sample_name.removesuffix("_total").removesuffix("_count").removesuffix("_bucket"))
    return [s for s in (fam.samples if fam else []) if s.name == sample_name
            and all(s.labels.get(k) == v for k, v in labels.items())]


def _by_replica(url, route="/predict", code="200") -> dict[str, float]:
    out: dict[str, float] = {}
    for s in _samples(_scrape(url), "ray_offramp_requests_total", route=route, code=code):
        out[s.labels["replica"]] = out.get(s.labels["replica"], 0.0) + s.value
    return out


def _labels(artifact) -> list[str]:
    from pipeline.model.artifact import read_manifest

    return read_manifest(artifact).label_names


def test_concurrent_clients_get_every_label_and_the_engines_answer(serve_env):
    url = serve_env["main"]
    ref = Predictor(serve_env["artifact"], EngineConfig(mode="release")).predict(TEXTS).predictions
    expected = {t: (p.label, p.exit_layer, p.score) for t, p in zip(TEXTS, ref)}
    labels = set(_labels(serve_env["artifact"]))
    jobs = [TEXTS[i % len(TEXTS)] for i in range(30)] + [TEXTS[i: i + 3] for i in range(0, 8)]

    def ask(inputs):  # one text as TEI's string; a batch as TEI's [[text], ...]
        return inputs, post(url, {"inputs": inputs if isinstance(inputs, str) else [[t] for t in inputs]})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, jobs))
    for inputs, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        if isinstance(inputs, str):  # one text -> [{label, score, exit_layer, ...}, {label, score}]
            assert isinstance(body[0], dict) and r.headers["x-offramp-exit-layer"] == str(body[0]["exit_layer"])
            rows, texts = [body], [inputs]
        else:  # a batch -> one list per text, in order
            assert len(body) == len(inputs) and all(isinstance(x, list) for x in body)
            rows, texts = body, inputs
        for text, entries in zip(texts, rows):
            label, layer, score = expected[text]
            assert {e["label"] for e in entries} == labels and entries == sorted(entries, key=lambda e: -e["score"])
            assert (entries[0]["label"], entries[0]["exit_layer"]) == (label, layer), text
            assert entries[0]["score"] == pytest.approx(score, abs=1e-4)
            assert sum(e["score"] for e in entries) == pytest.approx(1.0, abs=1e-5)
            assert set(entries[1]) == {"label", "score"}  # offramp's keys ride on the top entry only


def test_inference_client_gets_what_requests_and_the_engine_get(serve_env, monkeypatch):
    """huggingface_hub's InferenceClient, pointed at the app as at a TEI server. Like TEI, offramp answers one
    text with a flat list, and the client's parser (written for the HF Inference API's [[...]] nesting) keeps
    its first element: the top-ranked label."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the hub itself is never called
    url = serve_env["main"]
    client = InferenceClient(base_url=url, timeout=30)
    ref = Predictor(serve_env["artifact"], EngineConfig(mode="release")).predict(TEXTS[:4]).predictions
    for text, want in zip(TEXTS[:4], ref):
        got = client.text_classification(text)
        plain = requests.post(url, json={"inputs": text}, timeout=30)  # POST / as the client does, plain JSON
        assert plain.status_code == 200
        top = plain.json()[0]
        assert (got.label, got["exit_layer"]) == (top["label"], top["exit_layer"]) == (want.label, want.exit_layer)
        assert got.score == pytest.approx(top["score"], abs=1e-6) and got.score == pytest.approx(want.score, abs=1e-4)
        assert client.text_classification(text, top_k=1).label == want.label
        raw = client.text_classification(text, function_to_apply="none")
        assert raw.label == want.label and raw.score != pytest.approx(got.score)  # the logit, not the probability
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError) as e:  # TEI's error shape reaches the user's exception
        client.text_classification("")
    assert e.value.response.status_code == 400 and "empty" in str(e.value)


def test_tei_requests_and_errors_and_the_replica_keeps_serving(serve_env):
    url = serve_env["main"]
    long = " ".join(["word"] * 400)  # over the tiny model's 128 tokens
    ok = post(url, {"inputs": [["a fine film"], ["dull"]], "raw_scores": True, "truncate": None,
                    "truncation_direction": "Left", "parameters": {"top_k": 1}, "unknown_field": 1})
    assert ok.status_code == 200, ok.text
    assert [len(x) for x in ok.json()] == [1, 1]  # top_k honoured
    raw, soft = post(url, {"inputs": "dull", "raw_scores": True}).json(), post(url, {"inputs": "dull"}).json()
    assert [e["label"] for e in raw] == [e["label"] for e in soft] and sum(e["score"] for e in raw) != pytest.approx(1)
    assert post(url, {"inputs": long}).status_code == 200  # truncated by default, as TEI's --auto-truncate
    assert post(url, {"inputs": long, "truncation_direction": "Left"}).status_code == 200
    for route in ("/", "/invocations"):
        assert post(url, {"inputs": "dull"}, path=route).json() == soft, route
    cases = [
        ({"inputs": long, "truncate": False}, 422, "Validation", "must have less than 128 tokens. Given: 402"),
        ({"inputs": ["first text", "second text"]}, 422, "Validation", "text pair"),
        ({"inputs": [["one"], ["two", "three"]]}, 422, "Validation", '"inputs"[1] is a text pair'),
        ({"inputs": ["a", "b", "c"]}, 422, "Validation", "flat list of 3"),
        ({"inputs": [["t"]] * 9}, 422, "Validation", "maximum allowed batch size 8"),
        ({"inputs": ""}, 400, "Empty", "empty"),
        ({"texts": "wrong key"}, 422, "Validation", 'missing "inputs"'),
        (b"", 400, "Validation", "empty request body"),
        (b'{"inputs": "unterminated', 400, "Validation", "not valid JSON"),
        (b'{"inputs": "caf\xe9 \xff"}', 400, "Validation", "not UTF-8"),
        (b'{"inputs": "' + b"x" * (10 * 1024 * 1024) + b'"}', 413, "Validation", "max_body_bytes"),
    ]
    for payload, status, error_type, words in cases:
        r = post(url, payload, timeout=60)
        shown = (payload[:40] if isinstance(payload, bytes) else str(payload)[:60], r.text[:300])
        assert r.status_code == status, shown
        assert words in r.json()["error"] and r.json()["error_type"] == error_type, shown
    assert requests.get(f"{url}/predict", timeout=10).status_code == 405
    for route in ("/health", "/", "/ping"):
        assert requests.get(f"{url}{route}", timeout=10).json()["status"] == "ok", route
    assert post(url, {"inputs": "still fine"}).status_code == 200


def test_timing_headers_and_info_describe_the_artifact(serve_env):
    from pipeline.model.artifact import read_manifest

    url = serve_env["main"]
    r = post(url, {"inputs": [["a fine film"], ["dull"]]})
    h = r.headers
    for k in ("x-compute-time", "x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time",
              "x-compute-tokens", "x-compute-characters"):
        assert h[k].isdigit(), k
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])
    assert int(h["x-compute-characters"]) == len("a fine film") + len("dull")
    assert h["x-compute-type"] == "cpu" and "x-offramp-exit-layer" not in h  # a batch: exit layers are in the body
    m = read_manifest(serve_env["artifact"])
    info = requests.get(f"{url}/info", timeout=10).json()
    assert info["model_id"] == serve_env["artifact"] and info["model_dtype"] == "float32"
    assert info["model_type"] == {"classifier": {"id2label": {str(i): n for i, n in enumerate(m.label_names)},
                                                 "label2id": {n: i for i, n in enumerate(m.label_names)}}}
    assert (info["max_input_length"], info["max_client_batch_size"], info["max_batch_tokens"]) == (128, 8, 4096)
    assert info["max_concurrent_requests"] == 64 and info["auto_truncate"] is True and info["version"]
    o = info["offramp"]
    assert [x["layer"] for x in o["ramps"]] == m.ramp_layers and o["mode"] == "release"
    assert [x["threshold"] for x in o["ramps"]] == pytest.approx(m.thresholds) or o["threshold_version"] > 0


def test_metrics_of_two_replicas_add_up_to_the_requests_sent(serve_env):
    """Each replica records through Ray's metrics API; GET /metrics (whichever replica serves it) gathers the
    app's series from Ray's exporter, so per-replica counts match the replicas that answered, and add up."""
    url = serve_env["main"]
    seen: list = []

    def settled():  # earlier tests' requests are all answered; wait until their export stops changing
        seen.append(_by_replica(url))
        return len(seen) >= 4 and seen[-1] == seen[-4]  # unchanged over ~3 export intervals

    _until(settled, 60, every_s=0.5, what="the exported counts to settle")
    before = seen[-1]
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda t: post(url, {"inputs": t}), TEXTS * 4))
    assert all(r.status_code == 200 for r in rs)
    answered: dict[str, int] = {}
    for r in rs:
        answered[r.headers["X-Offramp-Replica"]] = answered.get(r.headers["X-Offramp-Replica"], 0) + 1
    assert len(answered) == 2, answered

    def delta():
        now = _by_replica(url)
        return {k: now.get(k, 0) - before.get(k, 0) for k in now if now.get(k, 0) != before.get(k, 0)}

    got = _until(lambda: (d := delta()) and sum(d.values()) >= len(rs) and d, 30, what="the new requests' export")
    assert got == answered and sum(got.values()) == len(rs)
    fams = _scrape(url)
    for name in ("ray_offramp_request_latency_seconds_bucket", "ray_offramp_exits_total",
                 "ray_offramp_batch_texts_bucket", "ray_offramp_threshold_version", "ray_offramp_queue_texts",
                 "ray_offramp_feedback_rows_total"):
        samples = _samples(fams, name) or [s for f in fams.values() for s in f.samples if s.name == name]
        assert {s.labels["replica"] for s in samples} == set(answered), name  # both replicas, one app
        assert all(s.labels["application"] == "main" for s in samples), name


def _timed_post(url, inputs, t0):
    r = post(url, {"inputs": inputs})
    return r, time.monotonic() - t0


def test_a_ramp1_exit_is_answered_before_its_batch_finishes(serve_env):
    url, early, late = serve_env["hooks"], serve_env["early"], serve_env["late"]
    _settle(url)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(_timed_post, url, late, t0)  # no ramp answers it: ~1 s of slow layers
        _until(lambda: _running(url), 10, every_s=0.02, what="the busy batch")
        b = pool.submit(_timed_post, url, late, t0)  # `b` and `a` queue together behind `busy`
        _until(lambda: requests.get(f"{url}/health", timeout=10).json()["queue_texts"] == 1, 10, every_s=0.01,
               what="b to queue")
        a = pool.submit(_timed_post, url, early, t0)
        (ra, ta), (rb, tb), (rbusy, _) = a.result(), b.result(), busy.result()
    assert ra.status_code == rb.status_code == rbusy.status_code == 200
    assert ra.json()[0]["exit_layer"] == 1 and rb.json()[0]["exit_layer"] == 4
    # same batch: `late` keeps the batch's later layers slow (3 x SLOW_S); `early` left after layer 1
    assert tb - ta > 2 * SLOW_S, (ta, tb)
    assert int(ra.headers["x-inference-time"]) < int(rb.headers["x-inference-time"]) - 2000 * SLOW_S


def test_a_burst_past_the_queue_gets_429_with_retry_after_and_every_accepted_request_is_answered(serve_env):
    url = serve_env["hooks"]
    _settle(url)  # earlier tests' release tails (slow layers here) would delay `busy` by up to a layer
    with ThreadPoolExecutor(16) as pool:
        busy = pool.submit(post, url, {"inputs": serve_env["late"]})  # ~1 s of slow layers
        _until(lambda: _running(url), 10, every_s=0.02, what="the busy batch")
        t = time.monotonic()
        burst = list(pool.map(lambda i: post(url, {"inputs": f"burst text {i}"}), range(12)))  # max_queue=4
        assert busy.result().status_code == 200
    codes = [r.status_code for r in burst]
    assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
    for r in burst:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error_type"] == "Overloaded"
            assert "overloaded" in r.json()["error"].lower()
        else:
            assert r.json()[0]["label"]
    refused = [r for r in burst if r.status_code == 429]
    assert min(float(r.elapsed.total_seconds()) for r in refused) < 0.5  # refused at once, not after the drain
    assert time.monotonic() - t < 30
    assert post(url, {"inputs": "calm again"}).status_code == 200
    _until(lambda: sum(s.value for s in _samples(_scrape(url), "ray_offramp_overload_rejections_total"))
           >= len(refused), 30, what="the rejections' export")


def test_a_failing_batch_fails_every_request_in_it_and_none_hangs(serve_env):
    url = serve_env["hooks"]
    _settle(url)
    with ThreadPoolExecutor(4) as pool:
        busy = pool.submit(post, url, {"inputs": serve_env["late"]})  # ~1 s of slow layers
        _until(lambda: _running(url), 10, every_s=0.02, what="the busy batch")
        bad = pool.submit(post, url, {"inputs": "fail: this batch"}, 20)
        _until(lambda: requests.get(f"{url}/health", timeout=10).json()["queue_texts"] == 1, 10, every_s=0.01,
               what="the failing text to queue")
        mate = pool.submit(post, url, {"inputs": [["an innocent"], ["batch-mate"]]}, 20)
        rb, rm = bad.result(), mate.result()  # requests' timeout: a hang fails the test
        assert busy.result().status_code == 200
    for r in (rb, rm):
        assert r.status_code == 424 and r.json()["error_type"] == "Backend"
        assert "injected batch failure" in r.json()["error"]
    assert post(url, {"inputs": "after the failure"}).status_code == 200


def test_health_and_metrics(serve_env):
    url = serve_env["main"]
    h = requests.get(f"{url}/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["mode"] == "release"
    assert h.json()["compression"] == "none"  # what the replica runs (a skipped method says why)
    names = {s.name for f in _scrape(url).values() for s in f.samples}
    for name in ("ray_offramp_requests_total", "ray_offramp_request_latency_seconds_bucket", "ray_offramp_exits_total",
                 "ray_offramp_realized_agreement", "ray_offramp_threshold_version", "ray_offramp_queue_texts",
                 "ray_offramp_batch_texts_bucket"):
        assert name in names, name


def test_controller_gets_feedback_and_replicas_outlive_it(serve_env, ray_session):
    ray = ray_session
    url, name = serve_env["main"], serve_env["controller"]
    handle = ray.get_actor(name, namespace=NAMESPACE)
    for t in TEXTS:
        assert post(url, {"inputs": t}).status_code == 200
    _until(lambda: ray.get(handle.get_state.remote(), timeout=10)["rows"] > 0, 20, what="feedback at the controller")
    before = _round(url)
    ray.kill(handle, no_restart=True)
    _until(lambda: not _alive(ray, name), 10, what="the controller to die")
    a, b = _round(url), _round(url)  # several batches each: every replica tries to refresh and fails
    assert set(a) == set(b) == set(before), "both replicas answer in every round"
    for replica in a:
        # Last thresholds kept: one version per replica, never older than before the kill, and the same answers
        # (scores up to float rounding: concurrent texts share batches).
        versions = {e[0]["threshold_version"] for e in [*a[replica].values(), *b[replica].values()]}
        assert len(versions) == 1 and versions.pop() >= max(e[0]["threshold_version"] for e in before[replica].values())
        for text in set(a[replica]) & set(b[replica]):
            want = a[replica][text]
            assert [{**x, "score": pytest.approx(x["score"], abs=1e-4)} for x in want] == b[replica][text]
    assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"


def _round(url) -> dict[str, dict[str, list]]:
    """Every text three times, concurrently: {replica: {text: body}}; every request answered."""
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda t: (t, post(url, {"inputs": t})), TEXTS * 3))
    out: dict[str, dict[str, list]] = {}
    for t, r in rs:
        assert r.status_code == 200, r.text
        out.setdefault(r.headers["X-Offramp-Replica"], {})[t] = r.json()
    return out


def _alive(ray, name) -> bool:
    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True
