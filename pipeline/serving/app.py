"""The Ray Serve application: an HTTP ingress per replica around a ReplicaEngine, and its builder.

Routes, as Hugging Face text-embeddings-inference (TEI) serves a classifier (shapes: pipeline.serving.api):
    POST /predict, POST /, POST /invocations   {"inputs": "text" | [["t1"], ...]} -> every label, by score
    GET  /info                  TEI's model info (+ offramp's ramps and thresholds)
    GET  /health, GET /, GET /ping   200 {"status": "ok", "replica": ..., ...}; 503 TEI's Unhealthy error
    GET  /metrics               Prometheus text for the whole app (every replica, from Ray's metrics export)
Every response carries `X-Offramp-Replica` (the replica's id) and `X-Offramp-Threshold-Version`; predictions
also TEI's timing headers (x-total-time, x-tokenization-time, x-queue-time, x-inference-time, ms).

`app_builder(args)` is the `import_path` target of a normal Ray Serve config file, so `offramp serve`,
`serve run` and `serve deploy` all read the same YAML. It validates the args (ServeAppConfig), starts
(or finds) the one named controller actor shared by every replica, and binds the deployment. Replica
counts, autoscaling and ray_actor_options come from the YAML's `deployments:` section.
"""

import asyncio
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from pipeline.control.deployment import controller_name, own_controller_name
from pipeline.serving.api import ApiError, error_body, info_body, parse_predict_request, prediction_body
from pipeline.serving.batcher import BatchFailed, QueueFull
from pipeline.serving.config import ServeAppConfig
from pipeline.serving.metrics import CONTENT_TYPE, scrape_app

__all__ = ["DEPLOYMENT_NAME", "EarlyExitDeployment", "app_builder", "build_app", "resolve_config"]

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "EarlyExitDeployment"
api = FastAPI(title="offramp", docs_url=None, redoc_url=None)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (tests)
        return f"{os.uname().nodename}:{os.getpid()}"


def _ms(seconds: float) -> str:
    return str(int(seconds * 1000))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("offramp")
    except PackageNotFoundError:  # a source tree on PYTHONPATH
        return "0+unknown"


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=512, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class EarlyExitDeployment:
    """One replica: its own request queue, one model run at a time, answers released at their ramp."""

    def __init__(self, config: dict, controller: dict | None = None):
        from pipeline.serving.replica import ReplicaEngine

        self.config = ServeAppConfig.model_validate(config)
        self.engine = ReplicaEngine(self.config, controller, _replica_id(), metrics_backend="ray")
        self.limits = self.config.batching
        self.labels = list(self.engine.predictor.label_names)
        self.app_name = serve.get_replica_context().app_name

    def _respond(self, body, status: int = 200, headers: dict | None = None) -> JSONResponse:
        h = {"X-Offramp-Replica": self.engine.replica,
             "X-Offramp-Threshold-Version": str(int(self.engine.predictor.policy.version)), **(headers or {})}
        return JSONResponse(body, status_code=status, headers=h)

    async def _read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} (batching.max_body_bytes): "
                                "send fewer or shorter texts per request")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body is over {limit} bytes (batching.max_body_bytes): "
                                    "send fewer or shorter texts per request")
            chunks.append(chunk)
        return b"".join(chunks)

    @api.post("/predict")
    @api.post("/")  # TEI serves a classifier's predictions at / too (and at /invocations, SageMaker's route)
    @api.post("/invocations")
    async def predict(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            req = parse_predict_request(await self._read_body(request), self.limits.max_items_per_request,
                                        self.limits.max_body_bytes)
            encoded = self.engine.encode(req.texts, req.truncation_direction)
            t_tok = time.perf_counter() - t0
            if req.truncate is False and encoded.truncated.any():
                i = int(encoded.truncated.argmax())
                where = "`inputs`" if req.single else f"`inputs`[{i}]"
                raise ApiError(422, f"{where} must have less than {self.engine.predictor.max_length} tokens. Given: "
                                    f"{self.engine.token_count(req.texts[i])} (shorten it or send \"truncate\": true)")
            answer = await self.engine.predict_timed(encoded, req.texts)
            preds = answer.predictions
            failed = [(i, p.error) for i, p in enumerate(preds) if p.error]
            if failed:
                i, why = failed[0]
                raise ApiError(424, f"{len(failed)} of {len(preds)} texts failed; text {i}: {why}", "Backend")
            headers = {"x-compute-type": self.engine.predictor.device.type,
                       "x-compute-characters": str(sum(len(t) for t in req.texts)),
                       "x-compute-tokens": str(sum(len(ids) for ids in encoded.input_ids)),
                       "x-tokenization-time": _ms(t_tok), "x-queue-time": _ms(answer.queue_s),
                       "x-inference-time": _ms(answer.inference_s),
                       "X-Offramp-Threshold-Version": str(max(p.threshold_version or 0 for p in preds))}
            if req.single:
                headers["x-offramp-exit-layer"] = str(preds[0].exit_layer)
            head = self.engine.predictor.head
            body = prediction_body(preds, self.labels, req, head.transform, head.kind != "single_label")
            total = _ms(time.perf_counter() - t0)
            resp = self._respond(body, headers={**headers, "x-compute-time": total, "x-total-time": total})
        except ApiError as e:
            resp = self._respond(error_body(e.message, e.error_type), e.status, e.headers)
        except QueueFull as e:
            resp = self._respond(error_body(f"Model is overloaded: {e}", "Overloaded"), 429,
                                 {"Retry-After": str(e.retry_after_s)})
        except BatchFailed as e:
            resp = self._respond(error_body(str(e), "Backend"), 424)
        except Exception as e:  # noqa: BLE001 - a bad request must never take the replica down
            log.exception("unexpected error in /predict")
            resp = self._respond(error_body(f"internal error: {e!r}", "Backend"), 500)
        self.engine.metrics.request("/predict", resp.status_code, time.perf_counter() - t0)
        return resp

    @api.get("/health")
    @api.get("/")  # TEI's Inference API health route
    @api.get("/ping")  # and SageMaker's
    async def health(self) -> Response:
        h = self.engine.health()
        code = 200 if h["status"] == "ok" else 503
        self.engine.metrics.request("/health", code)
        body = h if code == 200 else {**error_body(f"unhealthy: {h['status']}", "Unhealthy"), **h}
        return self._respond(body, code)

    @api.get("/info")
    async def info(self) -> Response:
        p = self.engine.predictor
        offramp = {"mode": self.config.engine.mode, "compression": p.compression, "num_layers": p.model.num_layers,
                   "ramps": [{"layer": r.layer, "pooling": r.pooling, "active": bool(a), "threshold": float(t)}
                             for r, a, t in zip(p.manifest.ramps, p.policy.active, p.policy.thresholds)],
                   "threshold_version": int(p.policy.version), "replica": self.engine.replica}
        body = info_body(model_id=self.config.model, dtype=str(p.dtype).removeprefix("torch."), labels=self.labels,
                         max_input_length=p.max_length, batching=self.limits, version=_version(), offramp=offramp)
        self.engine.metrics.request("/info", 200)
        return self._respond(body)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """The whole application's metrics, gathered from every node's Ray metrics exporter."""
        self.engine.metrics.request("/metrics", 200)
        text, missed = await asyncio.to_thread(scrape_app, self.app_name)
        if missed and not text.strip():
            return self._respond(error_body("no Ray metrics exporter answered: " + "; ".join(missed), "Backend"), 503)
        if missed:  # a comment line: scrapers keep the rest
            text = "".join(f"# offramp: no answer from {m}\n" for m in missed).encode() + text
        return Response(text, media_type=CONTENT_TYPE, headers={"X-Offramp-Replica": self.engine.replica})

    def check_health(self) -> None:
        """Serve's periodic health check: a dead batch loop gets the replica restarted."""
        if not self.engine.queue.healthy:
            raise RuntimeError("batch loop is not running")


def resolve_config(args: dict, app_name: str | None = None) -> ServeAppConfig:
    """Validate the app args; the model path becomes absolute (replicas may run elsewhere), and the controller
    gets its name: the app's own (`offramp-serve-<app>`), or with `controller.share` one per model path."""
    cfg = ServeAppConfig.model_validate(args or {})
    if "://" not in cfg.model:  # a URL stays as it is: each replica's node fetches it (pipeline.data.cache)
        cfg = cfg.model_copy(update={"model": os.path.abspath(cfg.model)})
    if cfg.controller.enabled and not cfg.controller.name:
        # not the shared per-model name when unshared, even for an app built without its name
        name = (controller_name(cfg.model) if cfg.controller.share
                else own_controller_name("serve", app_name) if app_name
                else controller_name(cfg.model, "offramp-serve"))
        cfg = cfg.model_copy(update={"controller": cfg.controller.model_copy(update={"name": name})})
    return cfg


def build_app(args: "dict | ServeAppConfig", **deployment_options):
    """The bound application; `deployment_options` (num_replicas, ray_actor_options, ...) as in
    `serve.deployment` (a config file's `deployments:` section overrides them)."""
    from pipeline.control.deployment import calibrated_start, controller_constraint, start_controller
    from pipeline.data import storage
    from pipeline.model.artifact import read_manifest

    cfg = resolve_config(args.model_dump() if isinstance(args, ServeAppConfig) else args)
    storage.configure(cfg.storage)
    manifest = read_manifest(cfg.model)  # fails here, with advice, if the artifact is missing
    # exit mode feeds back only a share of texts: judge windows by an exact binomial test, close them on
    # answered texts, and ask for more feedback while the evidence is thin (release mode feeds back every text)
    defaults = None if cfg.engine.mode != "exit" else {
        "guard_alpha": 0.05, "window_output_rows": 2048,
        "feedback_min": cfg.engine.shadow_fraction, "feedback_max": max(cfg.engine.shadow_fraction, 0.2)}
    # Detached: the app outlives the driver that deploys it. Its name is the app's (resolve_config).
    # The app's budget: `constraint` (default the artifact's), less what compression lost on its check (replicas
    # feed back their own model's answers, not the float original's).
    promise = cfg.promise(manifest.constraint)
    budget = controller_constraint(manifest, promise)
    controller = start_controller(cfg.model, manifest, cfg.controller, own_name=cfg.controller.name, detached=True,
                                  thresholds=cfg.engine.thresholds, defaults=defaults, constraint=budget)
    if controller is not None and cfg.engine.mode == "exit" and not controller["joined"]:
        # exit mode's feedback is sparse: start from thresholds certified on the artifact's validation feedback
        # and hold them (back off on evidence), rather than tuning from scratch on a few shadow rows
        import ray

        start = calibrated_start(cfg.model, manifest, budget)
        if start is not None:
            ray.get(controller["handle"].calibrate.remote(*start), timeout=60)
    if controller is not None:
        controller = {k: v for k, v in controller.items() if k != "handle"}
    deployment = EarlyExitDeployment.options(**deployment_options) if deployment_options else EarlyExitDeployment
    return deployment.bind(cfg.model_dump(mode="json"), controller)


def app_builder(args: dict):
    """Ray Serve application builder (`import_path: pipeline.serving.app:app_builder`)."""
    return build_app(args)
