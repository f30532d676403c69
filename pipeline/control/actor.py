"""The controller as one named Ray actor per deployment."""
from __future__ import annotations

from typing import Any

from pipeline.config import TuningConfig
from pipeline.feedback import CostModel, FeedbackWindow

from .controller import ThresholdController
from .state import ControllerState

__all__ = ["DEFAULT_NAMESPACE", "get_or_create_controller", "list_controllers", "stop_controller"]

DEFAULT_NAMESPACE = "offramp"
_ACTOR_CLASS = None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        import ray

        _ACTOR_CLASS = ray.remote(ThresholdController)
    return _ACTOR_CLASS


def get_or_create_controller(
    name: str,
    costs: CostModel | dict[str, Any],
    config: TuningConfig | dict[str, Any] | None = None,
    initial_state: ControllerState | dict[str, Any] | None = None,
    checkpoint_url: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    warm_start: FeedbackWindow | dict[str, Any] | None = None,
    detached: bool = True,
    resources: dict[str, float] | None = None,
):
    """Start the named controller actor, or return the running one (its args then ignored).

    ``detached``: the actor outlives the driver that started it (shared controllers, Serve apps); otherwise the
    driver owns it and Ray removes it when the driver exits (a job's own controller).

    The actor takes no CPU (``num_cpus=0``: it must never starve Ray Data on a small machine), restarts
    forever (``max_restarts=-1``; its ``__init__`` restores the checkpoint), and does not retry calls
    that were in flight when it died (``max_task_retries=0``): reports are best-effort feedback and a
    restart loses the partial window anyway, while a state fetch is simply asked again later. Calls made
    while it restarts are queued by Ray and delivered once it is back. ``warm_start`` rows travel with the
    actor's arguments, so a restart with no checkpoint to restore warm-starts again.
    """
    cls = _actor_class()
    c = costs.to_dict() if isinstance(costs, CostModel) else dict(costs)
    cfg = config.model_dump() if isinstance(config, TuningConfig) else dict(config or {})
    init = initial_state.to_dict() if isinstance(initial_state, ControllerState) else initial_state
    return cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached" if detached else None,
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=0,
        resources=resources or None,
    ).remote(c, cfg, init, checkpoint_url, warm_start)


def list_controllers(namespace: str = DEFAULT_NAMESPACE, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every live controller in `namespace` on the connected cluster: name, version, windows, settings."""
    import ray

    out = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] != namespace:
            continue
        try:
            handle = ray.get_actor(entry["name"], namespace=namespace)
            state, described = ray.get([handle.get_state.remote(), handle.get_config.remote()], timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 - one unreachable actor must not hide the others
            out.append({"name": entry["name"], "error": repr(e)})
            continue
        out.append({"name": entry["name"], "version": state["version"], "windows": state.get("windows", 0),
                    "constraint": described["config"]["constraint"], "checkpoint_url": described["checkpoint_url"]})
    return out


def stop_controller(name: str, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """Remove the named controller (its checkpoint stays); False when none runs."""
    import ray

    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True
