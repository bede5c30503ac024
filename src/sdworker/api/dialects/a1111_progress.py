"""What the AUTOMATIC1111 dialect remembers per app, and its progress answers.

A1111 has one global state (the request being processed) and a table of task ids. Here
each API process keeps the jobs that its A1111 requests wait on and the force_task_id
of the last TASK_MEMORY requests; progress reads those jobs from the broker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from sdworker.api.dialects.a1111_models import (
    InternalProgressResponse,
    ProgressResponse,
    ProgressState,
)
from sdworker.api.dialects.a1111_spec import timestamp
from sdworker.api.services import Services
from sdworker.errors import JobNotFoundError
from sdworker.jobs import Job, JobStatus

TASK_MEMORY = 1000  # force_task_id -> job id, newest kept
CALLER_MEMORY = 1000  # callers whose options are kept, oldest dropped first
ANONYMOUS = "anonymous"


def caller_of(request: Request) -> str:
    """Who is asking: a digest of the Authorization header (the API key or Basic
    credentials the middleware accepted), or anonymous without one."""
    header = request.headers.get("authorization", "")
    return hashlib.sha256(header.encode()).hexdigest()[:16] if header else ANONYMOUS


@dataclass
class Tracked:
    """A job a request of this dialect waits on."""

    job_id: str
    kind: str  # scripts_txt2img, scripts_img2img, extras
    caller: str = ANONYMOUS
    interrupted: bool = False


@dataclass
class DialectState:
    """Per app: each caller's options, the jobs requests wait on, force_task_id -> job id.

    A1111's options, progress and interrupt are global to its one user. Here each caller
    (API key, or HTTP Basic credentials) has options of its own, and sees and interrupts
    only its own requests, so one app's POST /options (webuiapi's util_set_model does one
    before each txt2img) never switches the model under another's requests. Without API
    keys every caller is the same one, as in A1111."""

    defaults: dict[str, Any]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    active: dict[str, Tracked] = field(default_factory=dict)
    tasks: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def options_of(self, caller: str) -> dict[str, Any]:
        if caller not in self.options:
            if len(self.options) >= CALLER_MEMORY:
                self.options.pop(next(iter(self.options)))
            self.options[caller] = dict(self.defaults)
        return self.options[caller]

    def remember_task(self, task_id: str, job_id: str) -> None:
        self.tasks[task_id] = job_id
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > TASK_MEMORY:
            self.tasks.popitem(last=False)

    def shown_ids(self, id_task: str | None, caller: str) -> list[str]:
        """The jobs GET /progress chooses from: one task's, or the caller's active ones."""
        if id_task is None:
            return [job_id for job_id, t in self.active.items() if t.caller == caller]
        return [self.tasks[id_task]] if id_task in self.tasks else []


def fetch_jobs(services: Services, job_ids: list[str]) -> list[Job]:
    """The jobs that still exist (blocking: call from a thread)."""
    jobs = []
    for job_id in job_ids:
        try:
            jobs.append(services.broker.get(job_id))
        except JobNotFoundError:
            continue
    return jobs


def newest_live(jobs: list[Job]) -> Job | None:
    """The newest running job, else the newest queued one."""
    live = [job for job in jobs if not job.status.is_terminal()]
    return max(live, key=lambda j: (j.status is JobStatus.RUNNING, j.created_at), default=None)


def _elapsed(job: Job) -> float:
    start = job.started_at or job.created_at
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    return max(0.0, (datetime.now(UTC) - start).total_seconds())


def _fraction(job: Job) -> float:
    total = job.progress.total_steps
    return min(1.0, job.progress.step / total) if total else 0.0


def _step_text(job: Job) -> str:
    return f"Step {job.progress.step}/{job.progress.total_steps}"


def progress_body(job: Job | None, tracked: Tracked | None) -> ProgressResponse:
    """GET /progress for the job shown; None: idle (progress 0 and job_count 0, what
    webuiapi's util_wait_for_ready waits for)."""
    if job is None or job.status.is_terminal():
        return ProgressResponse(progress=0.0, eta_relative=0.0, state=ProgressState())
    running = job.status is JobStatus.RUNNING
    progress = min(1.0, 0.01 + _fraction(job)) if running else 0.0  # A1111 adds 0.01
    elapsed = _elapsed(job)
    state = ProgressState(
        interrupted=bool(tracked and tracked.interrupted),
        job=tracked.kind if tracked else "",
        job_count=1,
        job_timestamp=timestamp(job.started_at or job.created_at),
        sampling_step=job.progress.step,
        sampling_steps=job.progress.total_steps,
    )
    return ProgressResponse(
        progress=progress,
        eta_relative=elapsed / progress - elapsed if running else 0.0,
        state=state,
        textinfo=_step_text(job) if running else "In queue...",
    )


def task_progress(job: Job | None, id_live_preview: int) -> InternalProgressResponse:
    """POST /internal/progress for one task (A1111: progress and eta only while active)."""
    if job is None:
        return InternalProgressResponse(
            active=False, queued=False, completed=False, id_live_preview=-1, textinfo="Waiting..."
        )
    if job.status is not JobStatus.RUNNING:
        queued = job.status is JobStatus.QUEUED
        position = f"In queue: {job.queue_position}" if job.queue_position else "In queue..."
        return InternalProgressResponse(
            active=False,
            queued=queued,
            completed=job.status.is_terminal(),
            id_live_preview=-1,
            textinfo=position if queued else "Waiting...",
        )
    progress = _fraction(job)
    elapsed = _elapsed(job)
    return InternalProgressResponse(
        active=True,
        queued=False,
        completed=False,
        progress=progress,
        eta=elapsed / progress - elapsed if progress > 0 else None,
        id_live_preview=id_live_preview,
        textinfo=_step_text(job),
    )
