"""Prometheus metrics: request counts and latencies per endpoint, plus job and cache figures.

Under gunicorn several worker processes serve requests, so counters live in
PROMETHEUS_MULTIPROC_DIR (set by web/gunicorn_conf.py) and are summed at scrape time. Job
and cache figures come from the database when scraped, so they are the same whichever
process answers.
"""

from __future__ import annotations

import logging
import os
import time

from flask import Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

REQUESTS = Counter("recsys_http_requests_total", "HTTP requests by endpoint, method and status",
                   ["endpoint", "method", "status"])
LATENCY = Histogram(
    "recsys_http_request_duration_seconds",
    "HTTP request latency by endpoint",
    ["endpoint", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RECOMMENDATIONS = Counter("recsys_recommendation_submissions_total",
                          "POST /recommendations outcomes (cached = answered from the result cache)", ["outcome"])


class DatabaseCollector:
    """Jobs by status, worker liveness and cache figures, read when scraped."""

    def __init__(self, settings):
        self.settings = settings

    def collect(self):
        from recsys import jobs

        try:
            counts = jobs.job_counts(self.settings)
            cache = jobs.cache_stats(self.settings)
            workers = jobs.worker_status(self.settings)
        except Exception as exc:
            log.warning("metrics: could not read job figures: %s", exc)
            return
        by_status = GaugeMetricFamily("recsys_jobs", "Jobs by status", labels=["status"])
        for status, count in sorted(counts.items()):
            by_status.add_metric([status], count)
        yield by_status
        for key, value in sorted(cache.items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"recsys_cache_{key}", f"Result cache: {key}", value=value)
        alive = workers.get("alive")
        if isinstance(alive, bool | int):
            yield GaugeMetricFamily("recsys_workers_alive", "Workers with a recent heartbeat", value=int(alive))


def _endpoint_label() -> str:
    return request.url_rule.rule if request.url_rule is not None else "unmatched"


_children: dict[tuple, object] = {}


def _series(metric, *labels: str):
    """`metric.labels(*labels)`, looked up once per process: `labels()` takes a lock and builds its key on every
    call, a few µs of each request."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def count_recommendation(outcome: str) -> None:
    """One POST /recommendations outcome (cached, finished or enqueued)."""
    _series(RECOMMENDATIONS, outcome).inc()


def init_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _record(response):
        started = g.pop("metrics_started", None)
        if started is not None:
            endpoint, method = _endpoint_label(), request.method
            _series(LATENCY, endpoint, method).observe(time.perf_counter() - started)
            _series(REQUESTS, endpoint, method, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def metrics():
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(registry)
        else:
            registry.register(REQUESTS)
            registry.register(LATENCY)
            registry.register(RECOMMENDATIONS)
        registry.register(DatabaseCollector(current_app.config["RECSYS_SETTINGS"]))
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
