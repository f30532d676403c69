"""The controller as one named Ray actor per deployment."""
from __future__ import annotations

from typing import Any

from pipeline.config import ControllerConfig
from pipeline.feedback import CostModel, FeedbackWindow

from .controller import ThresholdController
from .state import ControllerState

__all__ = ["DEFAULT_NAMESPACE", "get_or_create_controller"]

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
    config: ControllerConfig | dict[str, Any] | None = None,
    initial_state: ControllerState | dict[str, Any] | None = None,
    checkpoint_url: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    warm_start: FeedbackWindow | dict[str, Any] | None = None,
):
    """Start the named detached controller actor, or return the running one (its args then ignored).

    The actor takes no CPU (``num_cpus=0``: it must never starve Ray Data on a small machine), restarts
    forever (``max_restarts=-1``; its ``__init__`` restores the checkpoint), and does not retry calls
    that were in flight when it died (``max_task_retries=0``): reports are best-effort feedback and a
    restart loses the partial window anyway, while a state fetch is simply asked again later. Calls made
    while it restarts are queued by Ray and delivered once it is back. ``warm_start`` rows travel with the
    actor's arguments, so a restart with no checkpoint to restore warm-starts again.
    """
    cls = _actor_class()
    c = costs.to_dict() if isinstance(costs, CostModel) else dict(costs)
    cfg = config.model_dump() if isinstance(config, ControllerConfig) else dict(config or {})
    init = initial_state.to_dict() if isinstance(initial_state, ControllerState) else initial_state
    return cls.options(
        name=name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        num_cpus=0,
    ).remote(c, cfg, init, checkpoint_url, warm_start)
