"""Shared test setup: quiet, offline, deterministic."""
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT classifier saved like a user's model (safetensors + tokenizer)."""
    from tests.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-bert"), "bert", num_layers=4)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model_dir, tmp_path_factory):
    """An early-exit artifact bootstrapped from the tiny model on 300 movie-review rows."""
    from pipeline.config import BootstrapConfig
    from pipeline.training.bootstrap import bootstrap

    out = tmp_path_factory.mktemp("tiny-ee")
    bootstrap(tiny_model_dir, str(out), BootstrapConfig(limit=300, epochs=5))
    return str(out)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server, its own process) on 127.0.0.1 at a free port: tests.s3server.S3Server."""
    from tests.s3server import S3Server

    with S3Server() as server:
        yield server


def pytest_collection_modifyitems(config, items):
    """`slow`: what a fast developer loop (`pytest -m "not slow"`) leaves to CI: every test that starts Ray
    (integration, e2e), trains or fine-tunes the real model, or compiles with torch.compile."""
    for item in items:
        path = str(item.fspath)
        if ("/integration/" in path or "/e2e/" in path or item.get_closest_marker("real_model")
                or item.get_closest_marker("compiles")):
            item.add_marker(pytest.mark.slow)
