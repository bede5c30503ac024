"""RunPod serverless's endpoint API over sdworker's queue: `POST /run` (queued),
`POST /runsync` (waits), `GET|POST /status/{id}`, `POST /cancel/{id}` and `GET /health`,
for clients of the SDXL + Wan RunPod worker this replaces (its `input` and `output`:
see runpod_format.py, shared with the serverless handler sdworker/runpod_handler.py).
Outputs are data URIs, or with `use_cloud_storage` the stored assets' URLs (local disk
served by /v1/assets, or S3). A bad input is a 400 `{"error": "..."}` naming the field,
and is never queued.

Under a prefix, the same routes also answer as `/{endpoint_id}/run` etc., so the runpod
SDK's `Endpoint` works with `runpod.endpoint_url_base = "<service>/runpod"` (any
endpoint id is accepted: one service is one endpoint). At the root those routes would
shadow other prefixes' paths, so they and `/health` are left out there.

Departures from RunPod: job ids are sdworker's; a `webhook` gets sdworker's signed job
webhook (its native body), not RunPod's; a job that is canceled while running reports
CANCELLED once its worker stops at the next step; `/stream` and `/purge-queue` are not
served; health counts no `retried` jobs (re-queued jobs are not counted apart).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import DialectError, build_spec, dialect_router
from sdworker.api.dialects.runpod_format import (
    NAMES,
    STATUS,
    health_body,
    job_output,
    parse_input,
    spec_fields,
    status_body,
    wants_urls,
)
from sdworker.api.jobflow import asset_bytes, cancel_job, enqueue_job, wait_for
from sdworker.api.routes.system import live_workers
from sdworker.api.services import Services
from sdworker.jobs import Job, JobStatus
from sdworker.settings import Settings

MAX_WAIT_MS = 300_000


class RunRequest(BaseModel):
    """RunPod's request body; its other top-level fields (policy, s3Config) are ignored."""

    model_config = ConfigDict(extra="ignore")

    input: dict[str, Any] = Field(description="The worker input: see the README (RunPod).")
    webhook: str | None = Field(
        default=None, description="Gets sdworker's signed job webhook when the job ends."
    )


def render_error(error: DialectError) -> Response:
    """RunPod's `{"error": "..."}`; a bad body is a 400, as RunPod answers it."""
    status = 400 if error.status == 422 else error.status
    return JSONResponse({"error": error.message}, status_code=status)


def _enqueue(body: RunRequest, services: Services) -> Job:
    """Translate, validate (400 naming the field) and queue. Blocking."""
    data = parse_input(body.input)
    refiner = services.features_of(None).refiner
    fields = spec_fields(data, refiner_available=refiner)
    if body.webhook is not None:
        fields["webhook"] = body.webhook
    job, _ = enqueue_job(build_spec(fields, NAMES), services)
    return job


async def _status(services: Services, job: Job) -> dict[str, Any]:
    """The job's RunPod status, with its output read from storage once it completed."""
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        return status_body(job)
    payloads = None
    if not wants_urls(job):
        payloads = [await asset_bytes(services, asset) for asset in job.result.assets]
    return status_body(job, job_output(job, payloads))


def _endpoint_id(
    endpoint_id: Annotated[str, Path(description="Any id: this service is one endpoint.")],
) -> None:
    """Declares the SDK's endpoint id in the schema; its value is not used."""


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(render_error, names=NAMES)

    async def run(body: RunRequest, services: ServicesDep) -> dict[str, Any]:
        """RunPod: queue a job; poll /status/{id} for its output."""
        job = await run_in_threadpool(_enqueue, body, services)
        return {"id": job.id, "status": STATUS[job.status]}

    async def runsync(
        body: RunRequest,
        request: Request,
        services: ServicesDep,
        wait: Annotated[
            int | None,
            Query(
                ge=1,
                le=MAX_WAIT_MS,
                description="Most ms to wait; at most (and by default) SDWORKER_SYNC_TIMEOUT_S.",
            ),
        ] = None,
    ) -> dict[str, Any]:
        """RunPod: run a job and wait for its output; IN_QUEUE/IN_PROGRESS (poll
        /status/{id}) when it takes longer. A client that leaves cancels its job."""
        job = await run_in_threadpool(_enqueue, body, services)
        timeout_s = services.settings.sync_timeout_s
        if wait is not None:  # a client may wait less than the server allows, not more
            timeout_s = min(timeout_s, wait / 1000)
        waited = await wait_for(services, job, request=request, timeout_s=timeout_s)
        return await _status(services, waited.job)

    async def status(job_id: str, services: ServicesDep) -> dict[str, Any]:
        """RunPod: a job's status, and its output once COMPLETED."""
        job = await run_in_threadpool(services.broker.get, job_id)
        return await _status(services, job)

    async def cancel(job_id: str, services: ServicesDep) -> dict[str, Any]:
        """RunPod: cancel a job (a running one stops at its next step)."""
        job = await run_in_threadpool(cancel_job, services, job_id)
        stopped = job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELED)
        return {"id": job.id, "status": "CANCELLED" if stopped else STATUS[job.status]}

    def health(services: ServicesDep) -> dict[str, Any]:
        """RunPod: job counts by state and idle/running workers."""
        stats = services.broker.stats()
        return health_body(stats, live_workers(services, stats.workers))

    routes: list[tuple[str, Any, list[str]]] = [
        ("/run", run, ["POST"]),
        ("/runsync", runsync, ["POST"]),
        ("/status/{job_id}", status, ["GET", "POST"]),
        ("/cancel/{job_id}", cancel, ["POST"]),
    ]
    if not at_root:  # at the root the native /health answers, and /{id}/... would shadow
        routes.append(("/health", health, ["GET"]))
        # The SDK's paths: {endpoint_url_base}/{endpoint_id}/run etc.
        routes += [("/{endpoint_id}" + path, call, methods) for path, call, methods in routes]
    for path, call, methods in routes:
        for method in methods:  # one route per method: each gets its own operation id
            words = "_".join(part.strip("{}") for part in path.split("/") if part)
            router.add_api_route(
                path,
                call,
                methods=[method],
                summary=f"RunPod: {call.__name__}",
                operation_id=f"runpod_{words}_{method.lower()}",
                dependencies=[Depends(_endpoint_id)] if "{endpoint_id}" in path else None,
            )
    return router
