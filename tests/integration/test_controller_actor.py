"""The controller as a detached Ray actor: shared versions, restarts from checkpoint, resilient clients."""
import time
import uuid

import numpy as np
import pytest

from pipeline.config import TuningConfig
from pipeline.control.actor import get_or_create_controller
from pipeline.control.client import ControllerClient
from pipeline.control.state import ControllerState
from pipeline.control.synthetic import synthetic_window
from pipeline.feedback import CostModel

NS = "offramp-tests"
SKILLS = [0.45, 0.6, 0.75, 0.9, 0.97]
COSTS = CostModel.uniform(6, [1, 2, 3, 4, 5], 0.01)


def _name(tag: str) -> str:
    return f"ctl-{tag}-{uuid.uuid4().hex[:8]}"


def _wait_for(pred, timeout_s=30.0, every_s=0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s")


@pytest.fixture
def controller(ray_session, tmp_path):
    """A fresh detached controller with a file checkpoint; killed for good afterwards."""
    ray = ray_session
    name = _name("t")
    url = f"file://{tmp_path}/ckpt/controller.json"
    cfg = TuningConfig(window_rows=256, adjust_ramps=False)
    handle = get_or_create_controller(name, COSTS, cfg, checkpoint_url=url, namespace=NS)
    ray.get(handle.ping.remote(), timeout=60)
    yield name, handle, url
    try:
        ray.kill(handle, no_restart=True)
    except Exception:
        pass


def test_get_or_create_returns_the_running_actor(ray_session, controller):
    ray = ray_session
    name, handle, url = controller
    again = get_or_create_controller(name, COSTS, TuningConfig(window_rows=7), checkpoint_url=url, namespace=NS)
    assert again._actor_id == handle._actor_id
    assert ray.get(again.get_config.remote(), timeout=10)["config"]["window_rows"] == 256  # first args win
    assert ray.get_actor(name, namespace=NS)._actor_id == handle._actor_id


def test_two_worker_clients_share_versions_and_survive_a_restart(ray_session, controller):
    ray = ray_session
    name, handle, _ = controller

    @ray.remote(num_cpus=0.25)
    class Worker:
        """Stands in for an inference actor: reports feedback, refreshes thresholds, never crashes."""

        def __init__(self, name, seed):
            self.client = ControllerClient(name, NS, refresh_every=1, timeout_s=1.0, reconnect_every_s=0.2)
            self.seed = seed

        def step(self, rows):
            w = synthetic_window(rows, SKILLS, seed=self.seed)
            self.seed += 1000
            sent = self.client.report(w)
            self.client.maybe_refresh()
            return {"sent": sent, **self.client.stats(), "thresholds": self.client.thresholds.tolist()}

        def refresh(self):
            self.client.refresh()
            s = self.client.state
            return None if s is None else s.to_dict()

    workers = [Worker.remote(name, seed) for seed in (1, 2)]
    assert [s["version"] for s in ray.get([w.refresh.remote() for w in workers], timeout=60)] == [0, 0]

    # Four 128-row reports -> two 256-row windows -> at least one new version.
    for _ in range(2):
        out = ray.get([w.step.remote(128) for w in workers], timeout=60)
        assert all(o["sent"] for o in out)
    state = _wait_for(lambda: (s := ray.get(handle.get_state.remote(), timeout=10))["windows"] >= 2 and s)
    assert state["version"] >= 1
    seen = ray.get([w.refresh.remote() for w in workers], timeout=60)
    assert [s["version"] for s in seen] == [state["version"]] * 2
    assert all(s["thresholds"] == state["thresholds"] for s in seen)

    # Kill the controller mid-stream; Ray restarts it and it restores the checkpoint.
    ray.kill(handle, no_restart=False)
    out = ray.get([w.step.remote(16) for w in workers], timeout=60)  # 32 rows: no window completes
    for o in out:  # workers keep going on their last state, no exception
        assert o["version"] == state["version"]
        assert o["thresholds"] == state["thresholds"]

    def restored():
        seen = ray.get([w.refresh.remote() for w in workers], timeout=60)
        return all(s["restores"] == 1 for s in seen) and seen

    seen = _wait_for(restored, timeout_s=60)
    for s in seen:
        assert s["version"] == state["version"]
        assert s["thresholds"] == state["thresholds"] and s["active"] == state["active"]

    # The restarted controller keeps tuning and both workers follow it.
    for _ in range(4):
        ray.get([w.step.remote(128) for w in workers], timeout=60)
    after = _wait_for(lambda: (s := ray.get(handle.get_state.remote(), timeout=10))["windows"] > state["windows"] and s)
    seen = ray.get([w.refresh.remote() for w in workers], timeout=60)
    assert [s["version"] for s in seen] == [after["version"]] * 2
    assert after["version"] >= state["version"]
    for w in workers:
        ray.kill(w)


def test_driver_clients_keep_last_state_while_the_controller_is_down(ray_session, controller):
    ray = ray_session
    name, handle, _ = controller
    clients = [ControllerClient(name, NS, refresh_every=2, timeout_s=0.5, reconnect_every_s=0.1) for _ in range(2)]
    for k in range(4):
        assert clients[k % 2].report(synthetic_window(128, SKILLS, seed=10 + k))
    state = _wait_for(lambda: (s := ray.get(handle.get_state.remote(), timeout=10))["windows"] >= 2 and s)
    for c in clients:
        assert c.refresh() and c.version == state["version"]

    ray.kill(handle, no_restart=False)
    for _ in range(4):  # reports and refreshes during the restart: never raise, state stays
        for c in clients:
            c.report(synthetic_window(8, SKILLS, seed=99))
            c.maybe_refresh()
            assert c.version == state["version"]
            assert np.array_equal(c.thresholds, np.asarray(state["thresholds"]))

    _wait_for(lambda: all(c.refresh() and c.state.restores == 1 for c in clients), timeout_s=60)
    assert all(c.version == state["version"] for c in clients)


def test_client_without_a_controller_never_raises(ray_session):
    init = ControllerState.initial(5)
    c = ControllerClient(_name("missing"), NS, initial_state=init, timeout_s=0.2, reconnect_every_s=0.0)
    assert c.report(synthetic_window(4, SKILLS, seed=0)) is False
    assert c.refresh() is False
    assert c.maybe_refresh(every_n_batches=1) is False
    assert c.version == 0 and c.thresholds.tolist() == [1.0] * 5
    assert c.stats()["reports_failed"] == 1 and not c.stats()["connected"]
    lonely = ControllerClient(_name("missing"), NS, timeout_s=0.2)
    assert lonely.version == -1 and lonely.thresholds is None


def test_shared_controller_warm_starts_from_the_artifact_and_again_after_a_restart(ray_session, tiny_artifact):
    from pipeline.config import ControllerSettings
    from pipeline.control.deployment import start_controller
    from pipeline.model.artifact import read_manifest

    ray = ray_session
    manifest = read_manifest(tiny_artifact)
    settings = ControllerSettings(name=_name("warm"), namespace=NS, tuning={"window_rows": 16}, share=True)
    ctl = start_controller(tiny_artifact, manifest, settings, own_name="unused")
    try:
        state = ray.get(ctl["handle"].get_state.remote(), timeout=30)
        rows = manifest.bootstrap["validation_rows"]
        assert state["warm_windows"] == rows // 16 and state["windows"] == 0 and state["version"] >= 1
        # No checkpoint: a restarted controller warm-starts again from the rows its arguments carry.
        ray.kill(ctl["handle"], no_restart=False)
        again = _wait_for(lambda: _state_or_none(ray, ctl["handle"]), timeout_s=60)
        assert again["warm_windows"] == rows // 16 and again["thresholds"] == state["thresholds"]
    finally:
        ray.kill(ctl["handle"], no_restart=True)
    cold = start_controller(tiny_artifact, manifest, settings.model_copy(
        update={"name": _name("cold"), "warm_start": False}), own_name="unused")
    try:
        assert ray.get(cold["handle"].get_state.remote(), timeout=30)["warm_windows"] == 0
    finally:
        ray.kill(cold["handle"], no_restart=True)


def _state_or_none(ray, handle):
    try:
        return ray.get(handle.get_state.remote(), timeout=5)
    except Exception:
        return None


def test_one_controller_per_deployment_and_sharing_is_explicit(ray_session, tiny_artifact):
    """Own controllers: one per name, replaced when a new run of that name asks for other settings. Shared ones:
    joined as they are, and joining with other settings fails naming the field. Listed, and stopped by name."""
    from pipeline.config import ControllerSettings
    from pipeline.control.actor import list_controllers, stop_controller
    from pipeline.control.deployment import ControllerMismatch, start_controller
    from pipeline.model.artifact import read_manifest

    ray = ray_session
    manifest = read_manifest(tiny_artifact)
    own = ControllerSettings(namespace=NS, tuning={"window_rows": 16}, warm_start=False)
    a = start_controller(tiny_artifact, manifest, own, own_name=_name("job-a"))
    b = start_controller(tiny_artifact, manifest, own, own_name=_name("job-b"))
    shared = own.model_copy(update={"share": True, "name": _name("shared")})
    s1 = start_controller(tiny_artifact, manifest, shared, own_name="unused")
    try:
        assert a["name"] != b["name"] and not a["joined"] and not b["joined"]
        # a second run under one name with another setting gets a fresh controller with that setting
        a2 = start_controller(tiny_artifact, manifest, ControllerSettings(
            namespace=NS, tuning={"window_rows": 32}, warm_start=False), own_name=a["name"])
        assert not a2["joined"]
        assert ray.get(a2["handle"].get_config.remote(), timeout=30)["config"]["window_rows"] == 32
        s2 = start_controller(tiny_artifact, manifest, shared, own_name="unused")
        assert s2["joined"] and s2["name"] == s1["name"]
        with pytest.raises(ControllerMismatch, match="config.window_rows: 16 -> 32"):
            start_controller(tiny_artifact, manifest, ControllerSettings(
                namespace=NS, tuning={"window_rows": 32}, warm_start=False, share=True, name=s1["name"]),
                own_name="unused")
        names = {c["name"]: c for c in list_controllers(NS)}
        assert {a["name"], b["name"], s1["name"]} <= set(names)
        assert names[b["name"]]["version"] == 0 and names[b["name"]]["constraint"] == manifest.constraint
    finally:
        for name in (a["name"], b["name"], s1["name"]):
            stop_controller(name, NS)
    assert not {a["name"], b["name"], s1["name"]} & {c["name"] for c in list_controllers(NS)}
    assert stop_controller(a["name"], NS) is False
