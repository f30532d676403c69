"""Starting the one shared controller for a deployed model (offline job or Serve app)."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from pipeline.control.records import CostModel


def cost_model(manifest) -> CostModel:
    """The controller's cost model from an artifact's measured latency profile."""
    from pipeline.model.profile import cost_arrays

    layer_costs, ramp_costs = cost_arrays(manifest.profile, manifest.num_layers, len(manifest.ramps))
    return CostModel(layer_costs=layer_costs, ramp_layers=np.array(manifest.ramp_layers), ramp_costs=ramp_costs)


def controller_name(model: str, prefix: str = "offramp-controller") -> str:
    """One controller per model path (and per kind of deployment via `prefix`)."""
    return f"{prefix}-{hashlib.sha1(os.path.abspath(model).encode()).hexdigest()[:10]}"


def start_shared_controller(model: str, manifest, settings, thresholds: list[float] | None = None,
                            prefix: str = "offramp-controller") -> dict | None:
    """Create (or find) the named controller actor for `model`; None when `settings.enabled` is off.

    `settings` is a pipeline.config.ControllerSettings. Returns what workers need to reach it
    (name, namespace, refresh_every_batches) plus the driver's `handle`.
    """
    if not settings.enabled:
        return None
    import ray

    from pipeline.control.controller import ControllerState, get_or_create_controller

    tuning = {"constraint": manifest.constraint, **settings.tuning}
    initial = ControllerState(version=0, thresholds=list(thresholds or manifest.thresholds),
                              active=list(manifest.active))
    name = settings.name or controller_name(model, prefix)
    handle = get_or_create_controller(name, cost_model(manifest), tuning, initial, settings.checkpoint_url,
                                      namespace=settings.namespace)
    ray.get(handle.ping.remote(), timeout=60)
    return {"name": name, "namespace": settings.namespace,
            "refresh_every_batches": settings.refresh_every_batches, "handle": handle}
