"""The Broker contract every queue backend meets (see tests/broker/test_contract.py)."""

from __future__ import annotations

import builtins
from collections.abc import Collection
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, Field

from sdworker.jobs import (
    Job,
    JobError,
    JobEvent,
    JobResult,
    JobSpec,
    JobStatus,
    WebhookAttempt,
)

DEFAULT_MAX_ATTEMPTS = 3


class WorkerInfo(BaseModel):
    """What a worker reports with each heartbeat; shown in /status and /health."""

    id: str
    host: str = ""
    pid: int | None = None
    device: str = ""
    model: str = ""
    model_loaded: bool = False
    models_loaded: list[str] = Field(
        default_factory=list,
        description="Models this worker holds loaded, least recently used first.",
    )
    memory_budget_bytes: int | None = None
    refiner_loaded: bool = Field(
        default=False, description="A loaded model holds its refiner (loaded on first use)."
    )
    current_job: str | None = None
    batch_jobs: list[str] = Field(
        default_factory=list, description="Every job of the batch being run (cross-job batching)."
    )
    vram_used_bytes: int | None = None
    fast_path: dict[str, Any] = Field(
        default_factory=dict, description="The speed switches the loaded model runs with."
    )
    started_at: datetime | None = None
    last_seen: datetime | None = None

    def jobs_held(self) -> list[str]:
        """The jobs this worker holds and keeps alive with its heartbeats."""
        held = list(self.batch_jobs)
        if self.current_job and self.current_job not in held:
            held.insert(0, self.current_job)
        return held


class BrokerStats(BaseModel):
    """Queue depth per priority, running jobs, finished jobs by status and error code,
    job durations (for the Prometheus histogram) and the workers seen."""

    queued: dict[str, int] = Field(default_factory=dict)
    running: int = 0
    finished: dict[str, int] = Field(default_factory=dict)
    errors_by_code: dict[str, int] = Field(default_factory=dict)
    duration_buckets: dict[str, int] = Field(default_factory=dict)  # upper bound -> count <=
    duration_sum_s: float = 0.0
    duration_count: int = 0
    workers: list[WorkerInfo] = Field(default_factory=list)


DURATION_BUCKETS_S = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Broker(Protocol):
    """A durable job queue with per-job event logs.

    Delivery is at-least-once: a job whose worker stops heartbeating is reclaimed and may
    run again. Completion is idempotent: only the worker that holds a running job can
    finish it, once. Where a re-queued job lands within its priority is the backend's:
    SQLite keeps its first place (it runs next), Redis appends it to the stream (it runs
    after the jobs already waiting); queue_position reports either truthfully.
    """

    def enqueue(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Store a queued job and emit `queued`. Returns (job, created). With an
        idempotency key seen before: the earlier job and False when the spec is equal,
        JobConflictError when it differs."""
        ...

    def claim(
        self,
        worker_id: str,
        *,
        batch_key: str | None = None,
        max_images: int | None = None,
        prefer_models: Collection[str] = (),
        affinity_wait_s: float = 0.0,
    ) -> Job | None:
        """Take the next queued job (highest priority, then oldest) for a worker: it
        becomes running, attempts grows by one, `started` is emitted.

        With batch_key (cross-job batching), take it only when that next job has this
        batch key (jobs.batch_key_of) and at most max_images images; otherwise None, and
        the queue is left as it was: a batch never takes jobs out of order. prefer_models
        does not apply to batch claims.

        Model affinity: prefer_models are the model keys (records.model_key: spec.model,
        "" for the default model) the worker has loaded. When the next job (the head)
        is for another model and has waited in the queue less than affinity_wait_s
        (since it was enqueued or last requeued), take instead the oldest queued job of
        the head's priority whose model is preferred, if there is one; never a job of
        lower priority. A head that has waited affinity_wait_s is taken by the next
        claim, whatever its model: nothing starves. affinity_wait_s <= 0 turns the
        preference off. Redis looks at the redis.AFFINITY_SCAN entries behind the head,
        SQLite at the whole priority."""
        ...

    def heartbeat(self, info: WorkerInfo) -> None:
        """Record a worker as alive (and the job it holds, if any)."""
        ...

    def progress(self, job_id: str, worker_id: str, step: int, total_steps: int) -> None:
        """Record progress of a running job held by the worker and emit `progress`."""
        ...

    def complete(self, job_id: str, worker_id: str, result: JobResult) -> bool:
        """Finish a running job held by the worker as succeeded (emits `completed`).
        False, changing nothing, when the worker no longer holds it."""
        ...

    def fail(
        self, job_id: str, worker_id: str, error: JobError, *, retryable: bool = False
    ) -> bool:
        """Fail a running job held by the worker (emits `failed`); a retryable failure
        with attempts left goes back to the queue instead (emits `queued`)."""
        ...

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job is canceled at once and never runs; a running job is
        flagged and its worker stops at the next step; a finished job is left as is."""
        ...

    def cancel_requested(self, job_id: str) -> bool:
        """True when a cancel was asked for this job (the worker checks each step)."""
        ...

    def mark_canceled(self, job_id: str, worker_id: str) -> bool:
        """The worker stopped a job it held after a cancel request (emits `canceled`)."""
        ...

    def get(self, job_id: str) -> Job:
        """The job, with its queue position while queued; JobNotFoundError if unknown."""
        ...

    def find(self, idempotency_key: str) -> Job | None:
        """The job enqueued with this idempotency key, None when there is none (or,
        on Redis, when it has expired with its finished job)."""
        ...

    def list(
        self,
        *,
        status: JobStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        """Jobs newest first, optionally filtered; returns the page and the next cursor."""
        ...

    def events(self, job_id: str, after_id: int = 0) -> builtins.list[JobEvent]:
        """The job's events with id > after_id, oldest first (resumable streams)."""
        ...

    def wait_for_events(
        self, job_id: str, after_id: int = 0, timeout_s: float = 1.0
    ) -> builtins.list[JobEvent]:
        """events(), waiting up to timeout_s for at least one (live SSE delivery)."""
        ...

    def reclaim(self, *, stale_after_s: float, worker_id: str | None = None) -> builtins.list[str]:
        """Running jobs whose worker has not heartbeated for stale_after_s (or, with
        worker_id, every running job of that worker, known dead) go back to the queue,
        or fail with code `worker_lost` once they have used all attempts. Returns ids."""
        ...

    def record_webhook_attempt(self, job_id: str, attempt: WebhookAttempt) -> None:
        """Append a webhook delivery attempt to the job's record."""
        ...

    def workers(self) -> builtins.list[WorkerInfo]:
        """The workers seen recently, with their last heartbeat (cheap: /health uses it)."""
        ...

    def stats(self) -> BrokerStats:
        """Queue depth per priority, running count, finished counts, workers seen."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
