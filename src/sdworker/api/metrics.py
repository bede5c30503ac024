"""Prometheus metrics: request counters (middleware) and job/queue figures read from the
broker at scrape time, so they are right whichever process ran the jobs."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sdworker.broker.base import Broker


class BrokerCollector(Collector):
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        stats = self._broker.stats()
        depth = GaugeMetricFamily(
            "sdworker_queue_depth", "Queued jobs per priority", labels=["priority"]
        )
        for priority, count in stats.queued.items():
            depth.add_metric([priority], count)
        yield depth
        yield GaugeMetricFamily("sdworker_jobs_running", "Jobs running now", value=stats.running)
        finished = CounterMetricFamily(
            "sdworker_jobs_finished", "Finished jobs by final status", labels=["status"]
        )
        for status, count in stats.finished.items():
            finished.add_metric([status], count)
        yield finished
        errors = CounterMetricFamily(
            "sdworker_job_errors", "Failed jobs by error code", labels=["code"]
        )
        for code, count in stats.errors_by_code.items():
            errors.add_metric([code], count)
        yield errors
        durations = HistogramMetricFamily(
            "sdworker_job_duration_seconds", "Job time from submit to completion"
        )
        buckets = [(bound, float(count)) for bound, count in stats.duration_buckets.items()]
        buckets.append(("+Inf", float(stats.duration_count)))
        durations.add_metric([], buckets, sum_value=stats.duration_sum_s)
        yield durations
        vram = GaugeMetricFamily(
            "sdworker_gpu_memory_used_bytes", "GPU memory held by each worker", labels=["worker"]
        )
        for worker in stats.workers:
            if worker.vram_used_bytes is not None:
                vram.add_metric([worker.id], worker.vram_used_bytes)
        yield vram


def build_metrics(broker: Broker) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry of its own per app (no process-global state between apps)."""
    registry = CollectorRegistry()
    requests = Counter(
        "sdworker_http_requests",
        "HTTP requests",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "sdworker_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
    )
    registry.register(BrokerCollector(broker))
    return registry, requests, latency
