"""Every model family through the user's flow on a real local Ray: a tiny random classifier of each, bootstrapped,
then a certified job checked by `verify`, and a Serve app answering over HTTP on 127.0.0.1 as the local engine does.
(Equivalence with the transformers model's own logits is checked per family in tests/unit/test_families.py.)"""
from __future__ import annotations

import json
import socket
import time

import pytest
import requests
import yaml

from pipeline.config import BootstrapConfig, EngineConfig
from pipeline.engine.predictor import Predictor
from tests.integration.test_offline_job import _cfg, _write_parquet_dir
from tests.claims import holds
from tests.tiny import FAMILIES

NAMESPACE = "offramp-tests"
TEXTS = ["a fine film", "dull and long", "one of the best movies of the year", "meh"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """family -> a bootstrapped tiny artifact (4 layers, 3 ramps)."""
    from pipeline.training.bootstrap import bootstrap
    from tests.tiny import save_tiny

    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"flow-{family}")
        model = save_tiny(root / "model", family)
        bootstrap(model, str(root / "ee"), BootstrapConfig(limit=120, epochs=2))
        out[family] = str(root / "ee")
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("flow-corpus")
    _write_parquet_dir(path, 240, files=2)
    return path


@pytest.mark.parametrize("family", FAMILIES)
def test_a_certified_job_on_every_family_is_verified(ray_session, artifacts, corpus, tmp_path, family):
    from pipeline.offline.job import run_job
    from pipeline.offline.verify import verify

    cfg = _cfg(artifacts[family], corpus, tmp_path / "out", controller={"enabled": False},
               certify={"enabled": True, "calibration_rows": 60, "max_calibration_share": 0.3, "audit_fraction": 0.5,
                        "on_uncertified": "warn"})
    summary = run_job(cfg, echo=lambda m: None)
    cert = summary["certificate"]
    assert summary["rows"] == cert["answered"] == 240 and summary["errors"] == 0
    report = verify(str(tmp_path / "out"), echo=lambda m: None)
    assert report["rows_checked"] == 240
    assert holds(cert, report["agreement"]), (family, report["agreement"], cert["interval"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_family_answers_over_http_as_the_local_engine(ray_session, artifacts, tmp_path):
    """One Serve config, one app per family (as `offramp serve` deploys it): each answers TEI's request with the
    label, score and exit layer the local Predictor gives at the same thresholds."""
    from ray import serve

    from pipeline.commands.serve import deploy

    port = _free_port()
    deployment = {"name": "EarlyExitDeployment", "max_ongoing_requests": 16, "num_replicas": 1,
                  "ray_actor_options": {"num_cpus": 0.05}}
    apps = [{"name": family, "route_prefix": f"/{family}", "import_path": "pipeline.serving.app:app_builder",
             "args": {"model": artifacts[family], "controller": {"enabled": False},
                      "engine": {"dtype": "float32"}}, "deployments": [deployment]}
            for family in FAMILIES]
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"http_options": {"port": port}, "applications": apps}))
    t = time.monotonic()
    urls = dict(zip(FAMILIES, deploy(str(path), timeout_s=600, echo=lambda *_: None)))
    print(f"{len(apps)} apps deployed in {time.monotonic() - t:.1f} s")
    try:
        for family in FAMILIES:
            want = Predictor(artifacts[family], EngineConfig(mode="release", dtype="float32")).predict(TEXTS)
            r = requests.post(f"{urls[family]}/predict", data=json.dumps({"inputs": [[t] for t in TEXTS]}),
                              headers={"Content-Type": "application/json"}, timeout=60)
            assert r.status_code == 200, (family, r.text)
            for entries, p in zip(r.json(), want.predictions):
                assert (entries[0]["label"], entries[0]["exit_layer"]) == (p.label, p.exit_layer), family
                assert entries[0]["score"] == pytest.approx(p.score, abs=1e-4), family
    finally:
        serve.shutdown()
