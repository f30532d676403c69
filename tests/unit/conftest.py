"""Unit tests never start Ray: any ray.init fails the test."""
import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a hard dependency
        return

    def _refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", _refuse)
