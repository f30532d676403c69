"""One local Ray for the whole integration session (starting Ray costs seconds)."""
import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=100_000_000,
            log_to_driver=False,
            namespace="offramp-tests",
        )
    yield ray
    ray.shutdown()
