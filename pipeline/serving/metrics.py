"""The endpoint's Prometheus metrics, for the whole application.

Inside Serve they are recorded through Ray's metrics API (`ray.serve.metrics`, which tags every series with
`application`, `deployment` and `replica`): each node's Ray metrics exporter then serves every replica's
series as `ray_offramp_*`, which is what a Prometheus scraping the cluster reads (Ray's service discovery
file). GET /metrics gathers this application's `ray_offramp_*` series from every alive node's exporter
(`scrape_app`), so it answers for the whole app whichever replica serves the request. Ray's exporters lag
the replicas by up to `metrics_report_interval_ms` (10 s by default), and Ray's histograms report `_sum` from
bucket midpoints (counts and buckets are exact).

Outside Serve (a ReplicaEngine in a unit test or a script) the same metrics go to a private prometheus_client
registry, labelled with `replica`, rendered by `ServingMetrics.render`.
"""
from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline.control.stats import wilson

disable_created_metrics()  # no `*_created` series per counter: they only add noise to a scrape

__all__ = ["CONTENT_TYPE", "ServingMetrics", "scrape_app"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "ray_offramp_"
"""What Ray's exporters call offramp's metrics (Ray adds `ray_`)."""
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
_DROP_LABELS = {"otel_scope_name", "otel_scope_schema_url", "otel_scope_version", "SessionName", "Version",
                "Component"}  # the same on every series of a Ray session


class _Local:
    """prometheus_client metrics in a private registry; every series labelled with the replica's id."""

    def __init__(self, replica: str):
        self.replica = replica
        self.registry = CollectorRegistry(auto_describe=True)

    def metric(self, kind: str, name: str, doc: str, keys: tuple[str, ...] = (), buckets=None):
        cls = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}[kind]
        extra = {"buckets": buckets} if buckets else {}
        m = cls(name, doc, ("replica", *keys), registry=self.registry, **extra)
        record = {"counter": "inc", "gauge": "set", "histogram": "observe"}[kind]
        rep = self.replica
        return lambda value, *tags: getattr(m.labels(rep, *tags), record)(value)


class _Ray:
    """Ray Serve's metrics: exported by each node's Ray metrics agent; Serve adds application/deployment/replica."""

    def metric(self, kind: str, name: str, doc: str, keys: tuple[str, ...] = (), buckets=None):
        from ray.serve import metrics as rm

        if kind == "histogram":
            m = rm.Histogram(name, doc, boundaries=list(buckets), tag_keys=keys)
            return lambda value, *tags: m.observe(value, tags=dict(zip(keys, tags)) if keys else None)
        if kind == "gauge":
            m = rm.Gauge(name, doc, tag_keys=keys)
            return lambda value, *tags: m.set(value, tags=dict(zip(keys, tags)) if keys else None)
        m = rm.Counter(name, doc, tag_keys=keys)

        def inc(value, *tags):
            if value > 0:  # Ray refuses inc(0)
                m.inc(value, tags=dict(zip(keys, tags)) if keys else None)

        return inc


class ServingMetrics:
    """The endpoint's metrics. backend: "ray" inside Serve (whole-app export), "local" elsewhere."""

    def __init__(self, replica: str, backend: str = "local"):
        if backend not in ("ray", "local"):
            raise ValueError(f"metrics backend {backend!r} must be 'ray' or 'local'")
        self.replica = replica
        self.backend = b = _Ray() if backend == "ray" else _Local(replica)
        self.requests = b.metric("counter", "offramp_requests", "HTTP requests answered, by route and status code",
                                 ("route", "code"))
        self.latency = b.metric("histogram", "offramp_request_latency_seconds",
                                "POST /predict latency, request in to response out", buckets=_LATENCY_BUCKETS)
        self.rejected = b.metric("counter", "offramp_overload_rejections",
                                 "Requests answered 429 because the queue was full")
        self.exits = b.metric("counter", "offramp_exits", "Texts answered per exit layer (L = the original head)",
                              ("layer",))
        self.feedback_rows = b.metric("counter", "offramp_feedback_rows",
                                      "Texts that ran to the end (controller feedback)")
        self.feedback_agree = b.metric("counter", "offramp_feedback_agree",
                                       "Feedback texts whose released answer equals the original model's")
        self.agreement = b.metric("gauge", "offramp_realized_agreement",
                                  "Realized agreement with the original model on feedback texts (replica, cumulative)")
        self.agreement_bounds = b.metric(
            "gauge", "offramp_realized_agreement_bound",
            "Wilson 95% interval of the realized agreement on feedback texts (replica, cumulative): bound=lower|upper",
            ("bound",))
        self.policy_version = b.metric("gauge", "offramp_threshold_version", "Version of the thresholds in use")
        self.queue_rows = b.metric("gauge", "offramp_queue_texts", "Texts waiting for a batch")
        self.batches = b.metric("counter", "offramp_batches", "Batches run, by engine mode", ("mode",))
        self.batch_rows = b.metric("histogram", "offramp_batch_texts", "Texts per batch",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = b.metric("histogram", "offramp_batch_seconds", "Model time per batch",
                                      buckets=_LATENCY_BUCKETS)
        self.release_lead = b.metric("histogram", "offramp_release_lead_seconds",
                                     "How long before its batch ended a request was answered (early release)",
                                     buckets=_LATENCY_BUCKETS)
        self.failed_batches = b.metric("counter", "offramp_failed_batches",
                                       "Batches that failed (their requests got 424)")
        self.controller_failures = b.metric("gauge", "offramp_controller_failures",
                                            "Reports and state fetches to the controller that failed")
        self.tail_rows = b.metric("counter", "offramp_release_tail_rows",
                                  "Release mode: texts whose feedback waited for the replica to be idle: given when "
                                  "it ran (finished), or not, because texts arrived first or too much waited (dropped)",
                                  ("outcome",))
        self._agree = 0
        self._fb = 0

    def request(self, route: str, code: int, seconds: float | None = None) -> None:
        self.requests(1, route, str(code))
        if seconds is not None:
            self.latency(seconds)
        if code == 429:
            self.rejected(1)

    def batch(self, report, num_layers: int) -> None:
        """One BatchReport (pipeline.serving.batcher)."""
        self.batch_rows(report.rows)
        self.batch_seconds(report.seconds)
        for lead in report.release_lead_s:
            self.release_lead(lead)
        if report.error is not None or report.output is None:
            self.failed_batches(1)
            return
        out = report.output
        self.batches(1, str(out.stats.get("mode", "?")))
        layers: dict[int, int] = {}
        for p in out.predictions:
            if p.error is None:
                layers[p.exit_layer] = layers.get(p.exit_layer, 0) + 1
        for layer, n in layers.items():
            self.exits(n, str(layer))
        self.feedback(*out.shadow_agreement())

    def feedback(self, agree: int, total: int) -> None:
        """`total` texts ran to the end; `agree` of them were answered as the original model answers."""
        if not total:
            return
        self._agree += agree
        self._fb += total
        self.feedback_rows(total)
        self.feedback_agree(agree)
        self.agreement(self._agree / self._fb)
        lo, hi = wilson(self._fb - self._agree, self._fb)  # of disagreement
        self.agreement_bounds(1 - hi, "lower")
        self.agreement_bounds(1 - lo, "upper")

    def tail(self, rows: int, finished: bool) -> None:
        self.tail_rows(rows, "finished" if finished else "dropped")

    def status(self, queue_rows: int, policy_version: int, controller_failures: int = 0) -> None:
        """The replica's gauges, set after each batch (a Ray export has no render-time hook)."""
        self.queue_rows(queue_rows)
        self.policy_version(policy_version)
        self.controller_failures(controller_failures)

    def render(self) -> bytes:
        """This replica's metrics as Prometheus text (the local backend only; in Serve use `scrape_app`)."""
        if not isinstance(self.backend, _Local):
            raise RuntimeError("metrics go to Ray's exporters in Serve: use scrape_app(application)")
        return generate_latest(self.backend.registry)


class _Families:
    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def scrape_app(application: str, timeout_s: float = 5.0) -> tuple[bytes, list[str]]:
    """(Prometheus text of this application's offramp series from every alive node's Ray metrics exporter,
    the exporters that did not answer). Blocking (HTTP to each node): call it off the event loop."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]

    def fetch(url: str) -> str | Exception:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode("utf-8")
        except OSError as e:
            return e
        # the exporter serves every Ray metric (hundreds of series): parse only offramp's lines
        return "\n".join(line for line in text.splitlines()
                         if line.startswith(PREFIX) or line.startswith(("# HELP " + PREFIX, "# TYPE " + PREFIX)))

    with ThreadPoolExecutor(max(1, min(16, len(urls)))) as pool:
        texts = list(pool.map(fetch, urls))
    families: dict[str, object] = {}
    missed = []
    for url, text in zip(urls, texts):
        if isinstance(text, Exception):
            missed.append(f"{url}: {text}")
            continue
        for fam in text_string_to_metric_families(text):
            samples = [s._replace(labels={k: v for k, v in s.labels.items() if k not in _DROP_LABELS})
                       for s in fam.samples if s.labels.get("application") == application]
            if not samples:
                continue
            fam.samples = samples
            if fam.name in families:
                families[fam.name].samples.extend(samples)
            else:
                families[fam.name] = fam
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry), missed
