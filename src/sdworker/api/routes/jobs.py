"""Native v1 job routes: submit, get, list, cancel, stream events, generate synchronously."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from sdworker.api import jobflow
from sdworker.api.deps import ServicesDep
from sdworker.api.jobflow import asset_bytes, enqueue_job, submit, wait_for
from sdworker.api.services import Services
from sdworker.errors import InvalidJobError, JobConflictError
from sdworker.jobs import Job, JobEvent, JobSpec, JobStatus, WebhookFormat

router = APIRouter(prefix="/v1", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Same key and body: the same job comes back; another body: 409.",
    ),
]


class JobLinks(BaseModel):
    job: str
    events: str
    cancel: str


class JobAccepted(BaseModel):
    id: str
    status: JobStatus
    created: bool
    queue_position: int | None = None
    urls: JobLinks


class JobPage(BaseModel):
    jobs: list[Job]
    next_cursor: str | None = None


def _links(request: Request, job_id: str) -> JobLinks:
    job_url = str(request.url_for("get_job", job_id=job_id))
    return JobLinks(job=job_url, events=f"{job_url}/events", cancel=job_url)


def _native(spec: JobSpec) -> JobSpec:
    """Refuse what only a dialect may set: the edge callback format (its callbacks carry
    the edge system's service key and complete that system's jobs)."""
    if spec.webhook_format is not WebhookFormat.NATIVE:
        raise InvalidJobError(
            "webhook_format: only native here; the edge format is set by the edge dialect "
            "(POST /edge/jobs)",
            field="webhook_format",
        )
    return spec


@router.post("/jobs", status_code=202, response_model=JobAccepted)
def submit_job(
    spec: JobSpec, request: Request, services: ServicesDep, idempotency_key: IdempotencyKey = None
) -> JobAccepted:
    """Queue a generation job; follow it at `urls.events` (SSE) or `urls.job`."""
    job, created = enqueue_job(_native(spec), services, idempotency_key)
    return JobAccepted(
        id=job.id,
        status=job.status,
        created=created,
        queue_position=job.queue_position,
        urls=_links(request, job.id),
    )


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    services: ServicesDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=32, pattern=r"^\d*$")] = None,
) -> JobPage:
    """Jobs, newest first; pass `next_cursor` back as `cursor` for the next page."""
    jobs, next_cursor = services.broker.list(status=status, limit=limit, cursor=cursor)
    return JobPage(jobs=jobs, next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=Job, name="get_job")
def get_job(job_id: str, services: ServicesDep) -> Job:
    """The job: status, progress, queue position while queued, result or error."""
    return services.broker.get(job_id)


@router.delete("/jobs/{job_id}", response_model=Job)
def cancel_job(job_id: str, services: ServicesDep) -> Job:
    """Cancel: a queued job never runs; a running one stops at its next step."""
    job = jobflow.cancel_job(services, job_id)
    if job.status.is_terminal() and job.status is not JobStatus.CANCELED:
        raise JobConflictError(f"job {job_id} already {job.status.value}", field="job_id")
    return job


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: str,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)] = None,
) -> EventSourceResponse:
    """Server-Sent Events: queued, started, progress, completed|failed|canceled. The
    stream ends after the terminal event; reconnect with Last-Event-ID to resume."""
    await run_in_threadpool(services.broker.get, job_id)  # 404 before streaming
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return EventSourceResponse(_event_stream(services, job_id, after))


async def _event_stream(
    services: Services, job_id: str, after: int
) -> AsyncIterator[ServerSentEvent]:
    async for event in jobflow.job_events(services, job_id, after):
        yield _sse(event)


def _sse(event: JobEvent) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps(event.data), event=event.type.value, id=str(event.id))


@router.post(
    "/generate",
    response_model=Job,
    responses={
        200: {"content": {"image/png": {}}, "description": "The finished job, or image bytes"},
        202: {"model": Job, "description": "Still running at the timeout; poll the job"},
    },
)
async def generate(
    spec: JobSpec,
    request: Request,
    services: ServicesDep,
    accept: Annotated[str | None, Header()] = None,
) -> Response:
    """Submit and wait for the result (up to SDWORKER_SYNC_TIMEOUT_S). With
    `Accept: image/png` (or another image type) the first image's bytes come back, the
    seed in `X-Seed`. A client that disconnects cancels its job."""
    job = await submit(_native(spec), services)
    waited = await wait_for(services, job, request=request)
    job = waited.job
    if waited.disconnected:
        return Response(status_code=499)
    if not waited.finished:
        return JSONResponse(
            job.model_dump(mode="json"),
            status_code=202,
            headers={"Location": str(request.url_for("get_job", job_id=job.id))},
        )
    wants_image = accept is not None and "image/" in accept and "json" not in accept
    if wants_image and job.status is JobStatus.SUCCEEDED and job.result and job.result.assets:
        asset = job.result.assets[0]
        headers = {"X-Seed": str(job.result.seeds[0]), "X-Job-Id": job.id}
        data = await asset_bytes(services, asset)
        return Response(data, media_type=asset.content_type, headers=headers)
    return JSONResponse(job.model_dump(mode="json"))
