"""Deployment glue: starting the one controller of a deployment (offline job or Serve app) from its artifact."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from pipeline.feedback import CostModel, FeedbackWindow


def cost_model(manifest) -> CostModel:
    """The controller's cost model from an artifact's measured latency profile."""
    from pipeline.model.artifact import cost_arrays

    layer_costs, ramp_costs = cost_arrays(manifest.profile, manifest.num_layers, len(manifest.ramps))
    return CostModel(layer_costs=layer_costs, ramp_layers=np.array(manifest.ramp_layers), ramp_costs=ramp_costs)


def controller_name(model: str, prefix: str = "offramp-controller") -> str:
    """One controller per model path (and per kind of deployment via `prefix`)."""
    return f"{prefix}-{hashlib.sha1(os.path.abspath(model).encode()).hexdigest()[:10]}"


def own_controller_name(kind: str, name: str, run: str | None = None) -> str:
    """A deployment's own controller, `offramp-<kind>-<name>[-<run>]`: its name says which job (and run) or
    which Serve app it serves."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)[:40]
    return f"offramp-{kind}-{safe}" + (f"-{run}" if run else "")


class ControllerMismatch(ValueError):
    """A shared controller is running with other settings than this deployment asks for."""


def settings_diff(running: dict, wanted: dict) -> list[str]:
    """`field: running -> wanted` for every setting (tuning, costs, checkpoint) that differs."""
    out = []
    for section in ("config", "costs"):
        a, b = running.get(section) or {}, wanted.get(section) or {}
        for k in sorted(set(a) | set(b)):
            if _norm(a.get(k)) != _norm(b.get(k)):
                out.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    if running.get("checkpoint_url") != wanted.get("checkpoint_url"):
        out.append(f"checkpoint_url: {running.get('checkpoint_url')!r} -> {wanted.get('checkpoint_url')!r}")
    return out


def _norm(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_norm(x) for x in v]
    return round(v, 9) if isinstance(v, float) else v


def warm_start_window(model: str, manifest) -> FeedbackWindow | None:
    """The artifact's validation feedback (``validation_feedback.safetensors``) as a window, or None when the
    artifact has none (older artifacts: the controller then starts cold, as before)."""
    from pipeline.model.artifact import load_validation_feedback

    arrays = load_validation_feedback(model, num_ramps=len(manifest.ramps))
    return None if arrays is None else FeedbackWindow(*arrays)


def calibrated_start(model: str, manifest, budget: float, delta: float = 0.05) -> tuple[list[float], dict] | None:
    """(thresholds, evidence) certified on the artifact's validation feedback at `budget` (Learn then Test, as a job
    calibrates on its own rows), or None when the artifact has none. Where feedback is sparse (Serve's `exit` mode
    runs only a share of texts to the end), a controller that tunes from scratch on it holds its ramps nearly
    closed; one that holds these and backs off on evidence keeps the savings from the first request."""
    from pipeline.control.calibration import calibrate_sample

    window = warm_start_window(model, manifest)
    if window is None or not len(window):
        return None
    cal = calibrate_sample(window, None, cost_model(manifest), budget, delta, manifest.active)
    return [float(t) for t in cal.thresholds], {**cal.to_dict(), "data": "the artifact's validation feedback"}


def controller_constraint(manifest, promise: float | None = None, reference: bool = False) -> float:
    """The disagreement a controller may spend: the promise (default: the artifact's constraint), against the float
    original. With `reference` its feedback carries the float original's answers (a certified job), so it holds the
    whole promise; without, it sees only a compressed model's own head, so it holds the promise less what
    compression lost on its held-out check (Serve)."""
    promise = float(manifest.constraint) if promise is None else float(promise)
    if reference:
        return promise
    check = (manifest.compression or {}).get("check") or {}
    return max(0.0, promise - float(check.get("agreement_loss", 0.0)))


def initial_state(manifest, thresholds: list[float] | None = None):
    """A fresh controller's state: the artifact's thresholds (or `thresholds`) and active ramps, version 0."""
    from pipeline.control.state import ControllerState

    return ControllerState(version=0, thresholds=list(thresholds or manifest.thresholds), active=list(manifest.active))


def start_controller(model: str, manifest, settings, *, own_name: str, detached: bool = False,
                     thresholds: list[float] | None = None, defaults: dict | None = None,
                     warm_start: bool = True, constraint: float | None = None) -> dict | None:
    """Start the controller of one deployment; None when `settings.enabled` is off.

    `settings` is a pipeline.config.ControllerSettings; `constraint` the budget it guards (default:
    `controller_constraint(manifest)`); `defaults` are TuningConfig fields the deployment sets (the user's
    `settings.tuning` wins). Without `settings.share` the deployment gets its own controller
    called `settings.name` or `own_name` (owned by this driver unless `detached`; one left running under that
    name with other settings is replaced). With `settings.share` it joins the detached controller called
    `settings.name` (default: one per model path), starting it if none runs; ControllerMismatch when the
    running one has other settings. With `settings.warm_start` and `warm_start` a fresh controller first tunes
    on the artifact's validation feedback, when the artifact has it. Returns what workers need to reach it
    (name, namespace, refresh_every_batches), whether it was joined, and the driver's `handle`.
    """
    if not settings.enabled:
        return None
    import ray

    from pipeline.config import TuningConfig
    from pipeline.control.actor import get_or_create_controller, stop_controller

    budget = controller_constraint(manifest) if constraint is None else constraint
    tuning = {**(defaults or {}), **settings.tuning.model_dump(exclude_unset=True), "constraint": budget}
    costs = cost_model(manifest)
    wanted = {"config": TuningConfig.model_validate(tuning).resolved().model_dump(), "costs": costs.to_dict(),
              "checkpoint_url": settings.checkpoint_url}
    name = settings.name or (controller_name(model) if settings.share else own_name)
    running = _running(name, settings.namespace)
    if running is not None:
        diff = settings_diff(ray.get(running.get_config.remote(), timeout=60), wanted)
        if diff and settings.share:
            raise ControllerMismatch(
                f"controller {name!r} (namespace {settings.namespace!r}) is running with other settings: "
                f"{'; '.join(diff)}. Use its settings, give this deployment another controller.name, or stop it "
                f"first: offramp controllers --address ADDRESS --stop {name}")
        if diff:  # this deployment's own name: a previous run's controller, replaced by this run's settings
            stop_controller(name, settings.namespace)
            running = None
    warm = warm_start_window(model, manifest) if settings.warm_start and warm_start else None
    handle = running or get_or_create_controller(
        name, costs, tuning, initial_state(manifest, thresholds), settings.checkpoint_url,
        namespace=settings.namespace, warm_start=warm, detached=detached or settings.share,
        resources=settings.resources)
    ray.get(handle.ping.remote(), timeout=60)
    return {"name": name, "namespace": settings.namespace, "joined": running is not None,
            "refresh_every_batches": settings.refresh_every_batches, "handle": handle}


def _running(name: str, namespace: str):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None
