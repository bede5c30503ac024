"""A job's path through the API, shared by the native routes and every dialect: submit
(validate, then enqueue), wait for the end, follow its events, read its outputs."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio.to_thread
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from sdworker.api.services import Services
from sdworker.api.validation import validate_job
from sdworker.jobs import Asset, EventType, Job, JobEvent, JobSpec, JobStatus


def enqueue_job(spec: JobSpec, services: Services, key: str | None = None) -> tuple[Job, bool]:
    """Validate (4xx naming the field), then queue. Blocking: call from a thread."""
    validate_job(spec, services)
    return services.broker.enqueue(spec, idempotency_key=key)


def cancel_job(services: Services, job_id: str) -> Job:
    """Cancel a job (blocking). A queued one ends at once and no worker will ever see it,
    so its webhook goes from here; a running one is flagged and its worker reports it."""
    before = services.broker.get(job_id).status
    job = services.broker.cancel(job_id)
    if before is JobStatus.QUEUED and job.status is JobStatus.CANCELED:
        services.webhooks.notify(job, EventType.CANCELED)
    return job


async def submit(spec: JobSpec, services: Services, key: str | None = None) -> Job:
    job, _ = await run_in_threadpool(enqueue_job, spec, services, key)
    return job


@dataclass
class Waited:
    """The job as last seen; `disconnected` when the client left (the job was canceled)."""

    job: Job
    disconnected: bool = False

    @property
    def finished(self) -> bool:
        return self.job.status.is_terminal()


async def wait_for(
    services: Services,
    job: Job,
    *,
    request: Request | None = None,
    timeout_s: float | None = None,
) -> Waited:
    """Poll until the job ends or timeout_s (default: SDWORKER_SYNC_TIMEOUT_S) passes.
    A client that disconnects meanwhile cancels its job: nobody is left to take it."""
    settings = services.settings
    deadline = time.monotonic() + (settings.sync_timeout_s if timeout_s is None else timeout_s)
    while not job.status.is_terminal():
        if request is not None and await request.is_disconnected():
            await run_in_threadpool(cancel_job, services, job.id)
            return Waited(job, disconnected=True)
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(settings.poll_interval_s)
        job = await run_in_threadpool(services.broker.get, job.id)
    return Waited(job)


async def job_events(services: Services, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
    """The job's events after `after`, live, ending with its terminal event."""
    broker = services.broker
    while True:
        # Blocks up to a second for the next event (Redis: XREAD BLOCK; SQLite: polls).
        # Waits run on a thread pool of their own, so open streams never starve the
        # request handlers of threads.
        events = await anyio.to_thread.run_sync(
            broker.wait_for_events, job_id, after, 1.0, limiter=services.stream_limiter
        )
        for event in events:
            after = event.id
            yield event
            if event.type.is_terminal():
                return
        if not events:
            job = await run_in_threadpool(broker.get, job_id)
            if job.status.is_terminal():
                # It may have ended between the wait and this read: send what is left.
                for event in await run_in_threadpool(broker.events, job_id, after):
                    yield event
                return


async def asset_bytes(services: Services, asset: Asset, *, thumbnail: bool = False) -> bytes:
    """A stored output (or its thumbnail) as bytes."""
    key = asset.thumbnail_key if thumbnail else asset.key
    stored = await run_in_threadpool(services.storage.get, key)
    return stored.data


async def asset_base64(services: Services, asset: Asset) -> str:
    return base64.b64encode(await asset_bytes(services, asset)).decode()
