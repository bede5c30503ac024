"""Prometheus metrics: request counters (middleware) and job/queue figures read from the
broker at scrape time, so they are right whichever process ran the jobs."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sdworker.broker.base import Broker, BrokerStats

MetricFamily = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily


class BrokerCollector(Collector):
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    def collect(self) -> Iterator[MetricFamily]:
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
        yield _durations(
            stats, "sdworker_job_duration_seconds", "Job time from submit to completion"
        )
        vram = GaugeMetricFamily(
            "sdworker_gpu_memory_used_bytes", "GPU memory held by each worker", labels=["worker"]
        )
        for worker in stats.workers:
            if worker.vram_used_bytes is not None:
                vram.add_metric([worker.id], worker.vram_used_bytes)
        yield vram
        yield from dream_metrics(stats)


def _durations(stats: BrokerStats, name: str, documentation: str) -> HistogramMetricFamily:
    """The finished jobs' durations (submit to completion) as a histogram."""
    durations = HistogramMetricFamily(name, documentation)
    buckets = [(bound, float(count)) for bound, count in stats.duration_buckets.items()]
    buckets.append(("+Inf", float(stats.duration_count)))
    durations.add_metric([], buckets, sum_value=stats.duration_sum_s)
    return durations


def dream_metrics(stats: BrokerStats) -> Iterator[MetricFamily]:
    """The metrics the Dream AI service's docs name, unlabelled as there: every job
    accepted (queued, running or finished), finished-job durations, failed jobs."""
    accepted = sum(stats.queued.values()) + stats.running + sum(stats.finished.values())
    # CounterMetricFamily adds the _total suffix: image_generation_requests_total.
    yield CounterMetricFamily(
        "image_generation_requests", "Total generation requests", value=accepted
    )
    yield _durations(stats, "image_generation_duration_seconds", "Generation duration")
    yield CounterMetricFamily(
        "image_generation_errors", "Generation errors", value=stats.finished.get("failed", 0)
    )


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
