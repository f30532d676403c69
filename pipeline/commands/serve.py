"""`offramp serve configs/serve/<app>.yaml`: start Ray Serve with the early-exit application(s).

The YAML is a normal Ray Serve config file; this command does what `serve run <file>` does (start Serve
with the file's http_options, deploy the applications through Serve's controller, which applies the
file's `deployments:` options) plus: the offramp args are checked here first (a missing artifact fails in
a second, not after a build task), relative model paths are resolved against the current directory,
HTTP binds 127.0.0.1 unless the file or --host says otherwise, and the URLs are printed.
Heavy imports (ray) stay inside the functions.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

__all__ = ["deploy", "serve"]

OFFRAMP_IMPORT_PATH = "pipeline.serving.app:app_builder"


def _load_config(path: str, host: str | None, port: int | None):
    """ServeDeploySchema with offramp args resolved and the bind address settled."""
    from ray.serve.schema import ServeDeploySchema

    from pipeline.config import load_yaml
    from pipeline.data import storage
    from pipeline.model.artifact import read_manifest
    from pipeline.serving.app import resolve_config

    data = load_yaml(path)
    if "applications" not in data:
        raise ValueError(f"{path} is not a Ray Serve config file: it has no `applications:` list "
                         "(see configs/serve/movie_reviews.yaml)")
    http = dict(data.get("http_options") or {})
    http.setdefault("host", "127.0.0.1")  # never expose the endpoint by accident
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    data["http_options"] = http
    for app in data["applications"]:
        if app.get("import_path") == OFFRAMP_IMPORT_PATH:
            try:
                cfg = resolve_config(app.get("args") or {}, app.get("name"))
            except ValueError as e:
                raise ValueError(f"application {app.get('name')!r} in {path}: {e}") from e
            storage.configure(cfg.storage)
            read_manifest(cfg.model)  # a missing or foreign artifact fails now, with advice
            _check_ongoing(app, cfg)
            app["args"] = cfg.model_dump(mode="json", exclude_unset=False)
    return ServeDeploySchema.model_validate(data)


def _check_ongoing(app: dict, cfg) -> None:
    """Serve's per-replica limit must let requests reach the replica's own queue (else they wait in Serve's
    router, unbounded unless max_queued_requests is set, instead of getting 429)."""
    from pipeline.serving.app import DEPLOYMENT_NAME, EarlyExitDeployment

    ongoing = next((d.get("max_ongoing_requests") for d in app.get("deployments") or []
                    if d.get("name") == DEPLOYMENT_NAME), None) or EarlyExitDeployment.max_ongoing_requests
    if ongoing < cfg.batching.max_queue:
        click.echo(f"warning: application {app.get('name')!r}: max_ongoing_requests={ongoing} < batching.max_queue="
                   f"{cfg.batching.max_queue}: extra requests wait in Serve's router instead of getting 429; raise "
                   "max_ongoing_requests in its deployments: options", err=True)


def _own_controllers(config) -> list[tuple[str, str]]:
    """(name, namespace) of the controllers a loaded config's apps own (not shared ones)."""
    out = []
    for app in config.applications:
        ctl = (app.args or {}).get("controller") or {}
        if app.import_path == OFFRAMP_IMPORT_PATH and ctl.get("enabled") and not ctl.get("share"):
            out.append((ctl["name"], ctl["namespace"]))
    return out


def deploy(path: str, host: str | None = None, port: int | None = None, timeout_s: float = 300.0,
           echo=print) -> list[str]:
    """Deploy every application of the config file on the connected Ray; wait until RUNNING. URLs out."""
    from ray import serve
    # Ray's one private call here, on purpose: Ray has no public in-process API that deploys a Serve config file
    # (its own `serve run <file>` calls this; `serve deploy` needs the dashboard's REST API).
    from ray.serve._private.api import serve_start
    from ray.serve.config import gRPCOptions

    config = _load_config(path, host, port)
    client = serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        controller_options=config.controller_options,
    )
    client.deploy_apps(config, _blocking=False)
    names = [a.name for a in config.applications]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            app = apps[failed[0]]
            why = [app.message] + [f"{d}: {s.message}" for d, s in app.deployments.items() if s.message]
            raise RuntimeError(f"application {failed[0]!r} failed to deploy: " + "\n".join(w for w in why if w))
        if all(s == "RUNNING" for s in states.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout_s:.0f} s: {states}; check the replicas' "
                               "resources (ray_actor_options) against the cluster's")
        time.sleep(0.5)
    h = config.http_options
    shown = "127.0.0.1" if h.host in ("0.0.0.0", "::") else h.host
    urls = [f"http://{shown}:{h.port}{(a.route_prefix or '/').rstrip('/')}" for a in config.applications]
    for a, url in zip(config.applications, urls):
        echo(f"{a.name}: {url}/predict  (TEI protocol; also {url}/info, {url}/health, {url}/metrics)")
    return urls


@click.command("serve")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default=None, help="Bind address (default: the file's http_options.host, else 127.0.0.1).")
@click.option("--port", default=None, type=int, help="HTTP port (default: the file's http_options.port, else 8000).")
@click.option("--address", default=None, help="Ray cluster address (default: start an embedded local Ray).")
@click.option("--blocking/--no-blocking", default=True, show_default=True,
              help="Wait for Ctrl-C (an embedded Ray stops when this command exits).")
@click.option("--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds to wait for RUNNING.")
def serve(config_file, host, port, address, blocking, timeout_s):
    """Serve early-exit models over HTTP on Ray Serve (a Ray Serve config file; see configs/serve/)."""
    import ray

    from pipeline.offline import ray_session

    own: list[tuple[str, str]] = []
    joined = stopping = False
    try:
        own = _own_controllers(_load_config(config_file, host, port))  # bad args or artifacts fail before Ray
        if not ray.is_initialized():
            # SIGTERM and SIGINT stop it from here on, both through the `finally:` below (pipeline.offline.ray_session)
            ray_session.init(address=address, namespace="serve", log_to_driver=True)  # the namespace `serve run` uses
            joined = True
        deploy(config_file, host, port, timeout_s, echo=click.echo)
        if not blocking:
            if joined and address is None:
                click.echo("note: --no-blocking with an embedded Ray: the endpoint stops when this command exits",
                           err=True)
            return
        click.echo(f"serving {Path(config_file).name}; Ctrl-C to stop")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (ray_session.Interrupted), while deploying or serving
        stopping = True
        click.echo("shutting down")
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # pydantic's ValidationError is a ValueError
        raise click.ClickException(str(e)) from e
    finally:
        try:
            if stopping and ray.is_initialized():  # a second signal cuts this short; the session still stops
                _stop_apps(own)
        finally:
            if joined:  # an embedded Ray: every process it started is gone after this; a cluster: disconnected
                ray_session.shutdown()


def _stop_apps(own: list[tuple[str, str]]) -> None:
    """Serve's applications (drained) and the apps' own controllers; shared controllers stay."""
    from ray import serve as ray_serve

    from pipeline.control.actor import stop_controller

    ray_serve.shutdown()
    for name, namespace in own:
        stop_controller(name, namespace)
