"""Typed settings of the online endpoint: the `args:` of an application in a Ray Serve config file.

    applications:
    - name: movie-reviews
      import_path: pipeline.serving.app:app_builder
      args: {model: ..., engine: {...}, controller: {...}, batching: {...}}   <- ServeAppConfig
      deployments: [{name: EarlyExitDeployment, num_replicas: 2, ...}]          <- Ray Serve's own

Replica counts, autoscaling and `ray_actor_options` (num_cpus / num_gpus) stay in Ray Serve's
`deployments:` section, so `serve run` / `serve deploy` read the same file.
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.config import ControllerSettings, EngineConfig, StorageConfig, _Strict

__all__ = ["BatchingSettings", "ServeAppConfig"]

DEFAULT_PREDICTOR = "pipeline.engine.predictor:Predictor"


class BatchingSettings(_Strict):
    """How a replica turns queued requests into batches (its own queue, not `@serve.batch`)."""

    max_batch_size: int = Field(32, ge=1)
    """Most texts in one batch. A single request with more texts still runs, alone."""
    max_batch_tokens: int = Field(4096, ge=16)
    """Most tokens (sum of the texts' token counts, as in TEI) in one batch."""
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=10.0)
    """Longest a queued text waits for batch-mates while the model is idle. The replica waits only
    when the measured arrival rate can fill the batch within this time; under light load it does not
    wait at all, and while a batch runs the queue fills by itself (bigger batches under load)."""
    max_queue: int = Field(256, ge=1)
    """Most texts waiting for a batch. A request that would go past it gets 429 with Retry-After at once."""
    max_waiting_tails: int = Field(32, ge=1)
    """`release` mode: tails (a batch's answered texts waiting to run to the end for controller feedback;
    one per model pass, usually one per batch) kept while the replica is busy; past it the oldest is
    dropped. They run only when no text is queued."""
    max_items_per_request: int = Field(64, ge=1)
    """Most texts in one request (422 past it)."""
    max_body_bytes: int = Field(1_000_000, ge=64)
    """Largest request body in bytes (413 past it)."""

    @model_validator(mode="after")
    def _queue_fits_a_request(self) -> "BatchingSettings":
        if self.max_items_per_request > self.max_queue:
            raise ValueError(
                f"max_items_per_request={self.max_items_per_request} exceeds max_queue={self.max_queue}: such a "
                "request could never be queued; raise max_queue or lower max_items_per_request"
            )
        return self


class ServeAppConfig(_Strict):
    """One early-exit application on Ray Serve (`offramp serve configs/serve/<app>.yaml`)."""

    model: str
    """Early-exit artifact directory (from `offramp bootstrap`), visible to every replica. A relative
    path is resolved against the directory the app is built from."""
    engine: EngineConfig = Field(default_factory=lambda: EngineConfig(mode="release"))
    """Engine settings. Default `release` mode (Apparate): every text runs to the end, its answer is sent
    as soon as its ramp is confident. `exit` mode saves compute under heavy load."""
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    """The threshold controller shared by all replicas (one named detached actor)."""
    constraint: float | None = Field(None, gt=0, lt=1)
    """The app's accuracy budget: the largest share of answers that may disagree with the float original, what its
    controller tunes and guards (default: the artifact's constraint; a compressed artifact's controller holds it
    less what compression lost on its check). `controller.tuning.constraint`, if set, must equal it."""
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Endpoints and credentials for a `model:` URL (s3://, gs://, ...), as in a job's YAML; every replica
    applies them before it fetches the model (else the environment's, e.g. AWS_ENDPOINT_URL)."""
    predictor_class: str = DEFAULT_PREDICTOR
    """`module:Class` of the Predictor to host: a subclass can add instrumentation or pre-processing.
    It must keep Predictor's constructor, `predict_encoded` (with `defer_tail`), `finish_tail` and `warm_up`."""

    def promise(self, artifact_constraint: float) -> float:
        """`constraint`, default the artifact's; a `controller.tuning.constraint` set to another value is an error."""
        promise = self.constraint if self.constraint is not None else float(artifact_constraint)
        tuning = self.controller.tuning
        if "constraint" in tuning.model_fields_set and abs(tuning.constraint - promise) > 1e-12:
            where = "constraint" if self.constraint is not None else "the artifact's constraint"
            raise ValueError(f"controller.tuning.constraint={tuning.constraint} differs from the app's budget, {where} "
                             f"({promise}): set it with the app's `constraint` alone")
        return promise

    @field_validator("engine", mode="before")
    @classmethod
    def _release_by_default(cls, v):
        if isinstance(v, dict) and "mode" not in v:
            v = {**v, "mode": "release"}
        return v

    @field_validator("predictor_class")
    @classmethod
    def _import_path(cls, v: str) -> str:
        module, _, name = v.partition(":")
        if not module or not name:
            raise ValueError(f"predictor_class={v!r} must look like 'package.module:ClassName'")
        return v
