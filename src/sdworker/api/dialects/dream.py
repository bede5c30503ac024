"""The Dream AI image service's protocol (dream-ai-girl-v2's image_generation_service):
`POST /generate` queues a job and answers at once with its id, `GET /status/{job_id}`
is polled until the job is completed or failed, `GET /health` reports the pipeline.

Where it departs from the original, and why:
- num_inference_steps and guidance_scale take sdworker's ranges (1..150, 0..30), wider
  than the original's 20..50 and 5..15, so every value the original accepted still works
  and few-step models can be used; their defaults (30, 7.5) are the original's.
- girl_id is optional and, with user_id, context, affection_level, nsfw_level and any
  other field, is kept in the job's metadata (echoed by GET /v1/jobs/{id}); user_id
  owns the job's files. width and height are accepted (default: the model's, 1024x1024
  for SDXL); the original always rendered 1024x1024.
- priority is a real queue priority here (urgent, high, normal; anything else is a 422
  naming the allowed values); the original stored the string and ignored it.
- high_quality runs the refiner when one is configured and is ignored otherwise, as the
  original did when no refiner was loaded.
- Images are PNG and thumbnails WEBP (longest edge 256) under sdworker's asset URLs,
  not JPEGs on a CDN; a canceled job reads as failed with error "canceled" (the
  original had no cancel).
- /health answers 503 with the same body while no worker has its model loaded: the
  original loaded its model before it served at all, so its 200 always meant ready.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import (
    StatusError,
    build_spec,
    dialect_router,
    fastapi_detail,
)
from sdworker.api.jobflow import enqueue_job
from sdworker.api.routes.system import health_report
from sdworker.api.services import Services
from sdworker.errors import JobNotFoundError
from sdworker.jobs import MAX_STEPS, Job, JobSpec, JobStatus
from sdworker.settings import Settings

# JobSpec field -> this protocol's name, for error messages.
NAMES = {"steps": "num_inference_steps"}
# Fields of the original's body that only describe the request: kept in the metadata.
METADATA_FIELDS = ("girl_id", "context", "affection_level", "nsfw_level")
DreamStatus = Literal["queued", "processing", "completed", "failed"]
STATUS: dict[JobStatus, DreamStatus] = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "processing",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "failed",
}


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


class GenerateRequest(BaseModel):
    """The original's body; fields it did not know are kept in the job's metadata."""

    model_config = ConfigDict(extra="allow")

    user_id: int | Annotated[str, StringConstraints(min_length=1, max_length=255)] = Field(
        description="Owner of the job and its images (metadata.user_id)."
    )
    prompt: str
    negative_prompt: str | None = None
    num_inference_steps: int = Field(default=30, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    high_quality: bool = Field(default=False, description="Run the refiner when configured.")
    priority: Annotated[Literal["urgent", "high", "normal"], BeforeValidator(_lower)] = "normal"
    width: int | None = Field(default=None, ge=1, description="Default: the model's.")
    height: int | None = Field(default=None, ge=1, description="Default: the model's.")
    girl_id: int | str | None = Field(default=None, description="Kept in the metadata.")
    context: str | None = Field(default=None, description="Kept in the metadata.")
    affection_level: int = Field(default=50, ge=0, le=100, description="Kept in the metadata.")
    nsfw_level: int = Field(default=50, ge=0, le=100, description="Kept in the metadata.")


class DreamJob(BaseModel):
    """The original's ImageGenerationResponse: every key present, null until known."""

    job_id: str
    status: DreamStatus
    image_url: str | None = None
    thumbnail_url: str | None = None
    generation_time: float | None = Field(default=None, description="Seconds, start to end.")
    error: str | None = None


class DreamHealth(BaseModel):
    status: Literal["healthy", "starting", "unhealthy"]
    pipeline_loaded: bool
    refiner_loaded: bool
    gpu_available: bool
    gpu_count: int
    device: str | None = Field(description='"cuda", "cpu", ...; null: no live worker.')


def job_metadata(body: GenerateRequest) -> dict[str, Any]:
    """user_id, the descriptive fields the client sent and every unknown field."""
    sent = body.model_fields_set
    metadata: dict[str, Any] = {"user_id": body.user_id}
    metadata |= {name: getattr(body, name) for name in METADATA_FIELDS if name in sent}
    return metadata | (body.model_extra or {})


def generate_spec(body: GenerateRequest, services: Services) -> JobSpec:
    """The JobSpec of a request (blocking: reads the model's features)."""
    refiner = services.features_of(None).refiner
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "width": body.width,
        "height": body.height,
        "steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        # The original refined only when its refiner had loaded, else ran without.
        "high_quality": body.high_quality and refiner,
        "priority": body.priority,
        "metadata": job_metadata(body),
    }
    return build_spec(fields, NAMES)


def _queue(body: GenerateRequest, services: Services) -> Job:
    job, _ = enqueue_job(generate_spec(body, services), services)
    return job


def dream_job(job: Job) -> DreamJob:
    """A job as the original's status body."""
    reply = DreamJob(job_id=job.id, status=STATUS[job.status])
    if job.status is JobStatus.CANCELED:
        reply.error = "canceled"
    elif job.error is not None:
        reply.error = job.error.message
    result = job.result
    if job.status is JobStatus.SUCCEEDED and result is not None and result.assets:
        asset = result.assets[0]
        reply.image_url, reply.thumbnail_url = asset.url, asset.thumbnail_url
        # The original timed generation from its start, not from the submit.
        reply.generation_time = max(result.timings.total_s - result.timings.queue_s, 0.0)
    return reply


def device_type(device: str | None) -> str | None:
    """ "cuda:1" -> "cuda": the original named the device type only."""
    return device.split(":", 1)[0] if device else None


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(fastapi_detail, names=NAMES)

    @router.post("/generate", response_model=DreamJob, summary="Dream AI: queue a generation")
    async def dream_generate(body: GenerateRequest, services: ServicesDep) -> DreamJob:
        job = await run_in_threadpool(_queue, body, services)
        return DreamJob(job_id=job.id, status="queued")

    @router.get(
        "/status/{job_id}",
        response_model=DreamJob,
        responses={404: {"description": '{"detail": "Job not found"}'}},
        summary="Dream AI: a job's status",
    )
    async def dream_status(job_id: str, services: ServicesDep) -> DreamJob:
        try:
            job = await run_in_threadpool(services.broker.get, job_id)
        except JobNotFoundError:
            raise StatusError(404, "Job not found", code="not_found") from None
        return dream_job(job)

    if not at_root:  # at the root, the native /health answers (a superset)

        @router.get(
            "/health",
            response_model=DreamHealth,
            responses={503: {"model": DreamHealth, "description": "No worker is ready."}},
            summary="Dream AI: health",
        )
        def dream_health(services: ServicesDep) -> JSONResponse:
            report = health_report(services)
            body = DreamHealth(
                status=report.status,
                pipeline_loaded=report.pipeline_loaded,
                refiner_loaded=report.refiner_loaded,
                gpu_available=report.gpu_available,
                gpu_count=report.gpu_count,
                device=device_type(report.device),
            )
            status = 200 if report.status == "healthy" else 503
            return JSONResponse(body.model_dump(mode="json"), status_code=status)

    return router
