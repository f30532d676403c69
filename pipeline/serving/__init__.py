"""Online serving on Ray Serve: each replica keeps its own request queue, batches adaptively and answers
each request as soon as its ramp is confident (Apparate's early release); all replicas share one
threshold controller.

    config.py   ServeAppConfig / BatchingSettings (the `args:` of a Serve config file)
    api.py      the HTTP contract: Hugging Face TEI's text-classification protocol (requests, responses, errors)
    batcher.py  the request queue, adaptive batch policy and early-release futures (no Ray)
    replica.py  engine + queue + controller sync + metrics of one replica (no Ray needed)
    metrics.py  Prometheus metrics through Ray's metrics API; GET /metrics for the whole app
    app.py      the Serve deployment and `app_builder` (import_path target)
    commands.py the `offramp serve` command

Ray Serve is imported only by app.py and commands.py.
"""
from pipeline.serving.config import BatchingSettings, ServeAppConfig

__all__ = ["BatchingSettings", "ServeAppConfig"]
