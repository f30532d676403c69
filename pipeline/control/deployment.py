"""Deployment glue: starting the one controller of a deployment (offline job or Serve app) from its artifact."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from pipeline.feedback import CostModel, FeedbackWindow


def cost_model(manifest) -> CostModel:
    """The controller's cost model from an artifact's measured latency profile."""
    from pipeline.model.profile import cost_arrays

    layer_costs, ramp_costs = cost_arrays(manifest.profile, manifest.num_layers, len(manifest.ramps))
    return CostModel(layer_costs=layer_costs, ramp_layers=np.array(manifest.ramp_layers), ramp_costs=ramp_costs)


def controller_name(model: str, prefix: str = "offramp-controller") -> str:
    """One controller per model path (and per kind of deployment via `prefix`)."""
    return f"{prefix}-{hashlib.sha1(os.path.abspath(model).encode()).hexdigest()[:10]}"


def warm_start_window(model: str, manifest) -> FeedbackWindow | None:
    """The artifact's validation feedback (``validation_feedback.safetensors``) as a window, or None when the
    artifact has none (older artifacts: the controller then starts cold, as before)."""
    from pipeline.model.artifact import load_validation_feedback

    arrays = load_validation_feedback(model, num_ramps=len(manifest.ramps))
    return None if arrays is None else FeedbackWindow(*arrays)


def controller_constraint(manifest) -> float:
    """The disagreement the controller may spend: the artifact's constraint (against the original float
    model) less what compression already lost on its held-out check. The controller only sees the deployed
    model's own final head, so for a compressed artifact the rest of the budget is all it can hold."""
    check = (manifest.compression or {}).get("check") or {}
    return max(0.0, float(manifest.constraint) - float(check.get("agreement_loss", 0.0)))


def initial_state(manifest, thresholds: list[float] | None = None):
    """A fresh controller's state: the artifact's thresholds (or `thresholds`) and active ramps, version 0."""
    from pipeline.control.state import ControllerState

    return ControllerState(version=0, thresholds=list(thresholds or manifest.thresholds), active=list(manifest.active))


def start_shared_controller(model: str, manifest, settings, thresholds: list[float] | None = None,
                            defaults: dict | None = None, warm_start: bool = True) -> dict | None:
    """Create (or find) the named controller actor for `model`; None when `settings.enabled` is off.

    `settings` is a pipeline.config.ControllerSettings; `defaults` are ControllerConfig fields the deployment
    sets (the user's `settings.tuning` wins). With `settings.warm_start` and `warm_start` a fresh controller
    first tunes on the artifact's validation feedback, when the artifact has it. Returns what workers need to
    reach it (name, namespace, refresh_every_batches) plus the driver's `handle`.
    """
    if not settings.enabled:
        return None
    import ray

    from pipeline.control.actor import get_or_create_controller

    tuning = {"constraint": controller_constraint(manifest), **(defaults or {}),
              **settings.tuning.model_dump(exclude_unset=True)}
    initial = initial_state(manifest, thresholds)
    name = settings.name or controller_name(model)
    warm = warm_start_window(model, manifest) if settings.warm_start and warm_start else None
    handle = get_or_create_controller(name, cost_model(manifest), tuning, initial, settings.checkpoint_url,
                                      namespace=settings.namespace, warm_start=warm)
    ray.get(handle.ping.remote(), timeout=60)
    return {"name": name, "namespace": settings.namespace,
            "refresh_every_batches": settings.refresh_every_batches, "handle": handle}
