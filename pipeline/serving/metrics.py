"""Prometheus metrics of one replica, served as text at GET /metrics.

Each replica keeps its own registry and labels every sample with `replica`, so scrapes that land on
different replicas (through Serve's proxy) stay separate series.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pipeline.control.stats import wilson

disable_created_metrics()  # no `*_created` series per counter: they only add noise to a scrape

__all__ = ["CONTENT_TYPE", "ServingMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class ServingMetrics:
    def __init__(self, replica: str):
        self.replica = replica
        self.registry = r = CollectorRegistry(auto_describe=True)
        lab = ["replica"]
        self.requests = Counter("offramp_requests", "HTTP requests answered, by route and status code",
                                lab + ["route", "code"], registry=r)
        self.latency = Histogram("offramp_request_latency_seconds", "POST /predict latency, request in to response out",
                                 lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("offramp_overload_rejections", "Requests answered 503 because the queue was full",
                                lab, registry=r)
        self.exits = Counter("offramp_exits", "Texts answered per exit layer (L = the original head)",
                             lab + ["layer"], registry=r)
        self.feedback_rows = Counter("offramp_feedback_rows", "Texts that ran to the end (controller feedback)",
                                     lab, registry=r)
        self.feedback_agree = Counter("offramp_feedback_agree",
                                      "Feedback texts whose released answer equals the original model's", lab,
                                      registry=r)
        self.agreement = Gauge("offramp_realized_agreement",
                               "Realized agreement with the original model on feedback texts (replica, cumulative)",
                               lab, registry=r)
        self.agreement_bounds = Gauge(
            "offramp_realized_agreement_bound",
            "Wilson 95% interval of the realized agreement on feedback texts (replica, cumulative): bound=lower|upper",
            [*lab, "bound"], registry=r)
        self.policy_version = Gauge("offramp_threshold_version", "Version of the thresholds in use", lab, registry=r)
        self.queue_rows = Gauge("offramp_queue_texts", "Texts waiting for a batch", lab, registry=r)
        self.batches = Counter("offramp_batches", "Batches run, by engine mode",
                               lab + ["mode"], registry=r)
        self.batch_rows = Histogram("offramp_batch_texts", "Texts per batch", lab,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_seconds = Histogram("offramp_batch_seconds", "Model time per batch", lab,
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.release_lead = Histogram("offramp_release_lead_seconds",
                                      "How long before its batch ended a request was answered (early release)",
                                      lab, buckets=_LATENCY_BUCKETS, registry=r)
        self.failed_batches = Counter("offramp_failed_batches", "Batches that failed (their requests got 500)",
                                      lab, registry=r)
        self.controller_failures = Gauge("offramp_controller_failures",
                                         "Reports and state fetches to the controller that failed", lab, registry=r)
        self.tail_rows = Counter("offramp_release_tail_rows",
                                 "Release mode: texts whose feedback waited for the replica to be idle: given when it ran "
                                 "(finished), or not, because texts arrived first or too much waited (dropped)",
                                 lab + ["outcome"],
                                 registry=r)
        self._agree = 0
        self._fb = 0

    def request(self, route: str, code: int, seconds: float | None = None) -> None:
        self.requests.labels(self.replica, route, str(code)).inc()
        if seconds is not None:
            self.latency.labels(self.replica).observe(seconds)
        if code == 503:
            self.rejected.labels(self.replica).inc()

    def batch(self, report, num_layers: int) -> None:
        """One BatchReport (pipeline.serving.batcher)."""
        rep = self.replica
        self.batch_rows.labels(rep).observe(report.rows)
        self.batch_seconds.labels(rep).observe(report.seconds)
        for lead in report.release_lead_s:
            self.release_lead.labels(rep).observe(lead)
        if report.error is not None or report.output is None:
            self.failed_batches.labels(rep).inc()
            return
        out = report.output
        self.batches.labels(rep, str(out.stats.get("mode", "?"))).inc()
        for p in out.predictions:
            if p.error is None:
                self.exits.labels(rep, str(p.exit_layer)).inc()
        self.feedback(*out.shadow_agreement())

    def feedback(self, agree: int, total: int) -> None:
        """`total` texts ran to the end; `agree` of them were answered as the original model answers."""
        if not total:
            return
        rep = self.replica
        self._agree += agree
        self._fb += total
        self.feedback_rows.labels(rep).inc(total)
        self.feedback_agree.labels(rep).inc(agree)
        self.agreement.labels(rep).set(self._agree / self._fb)
        lo, hi = wilson(self._fb - self._agree, self._fb)  # of disagreement
        self.agreement_bounds.labels(rep, "lower").set(1 - hi)
        self.agreement_bounds.labels(rep, "upper").set(1 - lo)

    def tail(self, rows: int, finished: bool) -> None:
        self.tail_rows.labels(self.replica, "finished" if finished else "dropped").inc(rows)

    def render(self, queue_rows: int, policy_version: int, controller_failures: int = 0) -> bytes:
        self.queue_rows.labels(self.replica).set(queue_rows)
        self.policy_version.labels(self.replica).set(policy_version)
        self.controller_failures.labels(self.replica).set(controller_failures)
        return generate_latest(self.registry)
