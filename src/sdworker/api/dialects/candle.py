"""The Candle SD worker protocol (sd-worker-rbee, the rbee orchestrator's image worker):
`POST /execute`, `/img2img` and `/inpaint` answer with a Server-Sent Events stream of
`progress {step, total_steps, total, percent}` events, then `complete {image, seed,
elapsed_ms, format}` (standard base64 PNG, no `data:` prefix) or `error {message}`;
`GET /health` tells whether the worker is ready (and `GET /ready`, the later worker's
`{ready, reason?, timestamp}`). `sdworker candle-worker` mounts it at the root.

Where it departs from the original (whose routes were placeholders; the request bodies
are those of its early job_router.rs, the event names those of its later stream.rs):
- A body that fails validation is refused before any stream starts, with HTTP 422
  `{"error": "...", "field": ...}` naming the field; the original answered 500 text.
- steps, guidance_scale, width and height default to the served model's own defaults
  (30 steps and guidance 7.5 for SD 1.5/2.1/XL, as in job_router.rs; the size is the
  model's native one, 512/768/1024, as the later worker did) instead of a fixed 512x512.
  A Turbo model (`--sd-version turbo`) defaults to 4 steps and guidance 0, as there.
- img2img and inpaint make an image of the input image's size (rounded down to a
  multiple of 8, as the later worker did); `width`/`height` may override it.
- `num_samples` > 1 gives one `complete` event per image, each with its own seed
  (image i uses seed + i); the stream ends after the last.
- Seeds are 0..2^32-1 (sdworker's range), not u64. `loras` (hive paths) are refused.
- A client that disconnects cancels its job: nobody is left to receive the image.
- The later worker's field names are accepted as aliases: `input_image`/`init_image`
  for `image`, `mask_image` for `mask`; its other fields (hive_id, model, worker_id)
  are ignored, as this worker serves the one model it was started with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import DialectError, StatusError, build_spec, dialect_router
from sdworker.api.jobflow import asset_base64, cancel_job, job_events, submit
from sdworker.api.routes.system import Health, health_report
from sdworker.api.services import Services
from sdworker.families import Task
from sdworker.fetch import load_image
from sdworker.jobs import MAX_STEPS, SEED_MAX, EventType, Job, JobEvent, JobSpec, JobStatus
from sdworker.settings import Settings

log = logging.getLogger(__name__)

TURBO_STEPS = 4  # sd-worker-rbee's default for SDXL-Turbo (sdworker's turbo preset: 1)
SIZE_MULTIPLE = 8
# JobSpec field -> this protocol's name, for error messages.
NAMES = {"num_images": "num_samples"}


class _Common(BaseModel):
    """Fields every request of the protocol has."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    prompt: str = Field(description="What to draw.")
    negative_prompt: str | None = None
    steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="Default: the model's (Turbo: 4)."
    )
    guidance_scale: float | None = Field(
        default=None, ge=0, le=30, description="Default: the model's (7.5; Turbo: 0)."
    )
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX, description="Default: random (returned)."
    )
    num_samples: int = Field(default=1, ge=1, description="One `complete` event per image.")
    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    loras: list[Any] = Field(default_factory=list, description="Not supported: must be empty.")


class ExecuteRequest(_Common):
    """Text to image (width/height default to the model's size)."""


class Img2ImgRequest(_Common):
    """Image to image; the output has the input image's size unless width/height say."""

    image: str = Field(
        validation_alias=AliasChoices("image", "input_image", "init_image"),
        description="Base64 PNG/JPEG/WEBP (a data URI works too). Aliases: input_image, "
        "init_image.",
    )
    strength: float = Field(default=0.8, ge=0, le=1, description="How much to change.")


class InpaintRequest(_Common):
    """Inpainting: white in the mask is repainted, black kept."""

    image: str = Field(
        validation_alias=AliasChoices("image", "init_image", "input_image"),
        description="Base64 image. Aliases: init_image, input_image.",
    )
    mask: str = Field(
        validation_alias=AliasChoices("mask", "mask_image"),
        description="Base64 mask of the image's size, white = repaint. Alias: mask_image.",
    )


def render_error(error: DialectError) -> Response:
    body: dict[str, Any] = {"error": error.message}
    if error.field:
        body["field"] = error.field
    return JSONResponse(body, status_code=error.status)


def _image_size(ref: str, settings: Settings) -> tuple[int, int]:
    """The input image's size, rounded down to a multiple of 8 (blocking: decodes it)."""
    image = load_image(
        ref,
        field="image",
        max_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        policy=settings.address_policy,
        allow_paths=False,
    )
    width, height = image.size
    return _multiple_of_8(width), _multiple_of_8(height)


def _multiple_of_8(side: int) -> int:
    return max(SIZE_MULTIPLE, side - side % SIZE_MULTIPLE)


async def _spec(
    body: ExecuteRequest | Img2ImgRequest | InpaintRequest, task: Task, services: Services
) -> JobSpec:
    if body.loras:
        raise StatusError(
            422, "loras: not supported by this worker; send an empty list", field="loras"
        )
    steps = body.steps
    if steps is None:
        features = await run_in_threadpool(services.features_of, None)  # reads folders
        steps = TURBO_STEPS if features.variant == "turbo" else None
    fields: dict[str, Any] = {
        "task": task,
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": steps,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
        "num_images": body.num_samples,
        "width": body.width,
        "height": body.height,
        "output_format": "png",
    }
    if isinstance(body, Img2ImgRequest | InpaintRequest):
        fields["image"] = body.image
        if body.width is None or body.height is None:
            width, height = await run_in_threadpool(_image_size, body.image, services.settings)
            fields["width"] = body.width or width
            fields["height"] = body.height or height
    if isinstance(body, Img2ImgRequest):
        fields["strength"] = body.strength
    if isinstance(body, InpaintRequest):
        fields["mask"] = body.mask
    return build_spec(fields, NAMES)


def _event(name: str, data: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"type": name, **data}), event=name)


def _progress(event: JobEvent) -> ServerSentEvent:
    step, total = int(event.data.get("step", 0)), int(event.data.get("total_steps", 0))
    percent = float(event.data.get("percent", 100.0 * step / total if total else 0.0))
    return _event(
        "progress", {"step": step, "total_steps": total, "total": total, "percent": percent}
    )


async def _completes(services: Services, job: Job) -> AsyncIterator[ServerSentEvent]:
    """One `complete` event per image of the finished job, each with its seed."""
    result = job.result
    if job.status is not JobStatus.SUCCEEDED or result is None or not result.assets:
        yield _event("error", {"message": f"job {job.id} ended without an image"})
        return
    elapsed_ms = round(result.timings.total_s * 1000)
    for asset, seed in zip(result.assets, result.seeds, strict=False):
        image = await asset_base64(services, asset)
        yield _event(
            "complete", {"image": image, "format": "png", "seed": seed, "elapsed_ms": elapsed_ms}
        )


@dataclass
class _Watched:
    """One streamed job; `settled` once it has ended or this stream has canceled it
    (the stream's end and the disconnect handler both try: only the first acts)."""

    job: Job
    settled: bool = False


async def _cancel_unfinished(services: Services, watched: _Watched) -> None:
    """Cancel a job nobody waits for any more."""
    if watched.settled:
        return
    watched.settled = True
    job_id = watched.job.id
    try:
        await run_in_threadpool(cancel_job, services, job_id)
    except Exception:  # the stream is gone either way; the job ends on its own
        log.exception("could not cancel job %s of a closed stream", job_id)
        return
    log.info("canceled job %s: its client went away", job_id)


async def _stream(services: Services, watched: _Watched) -> AsyncIterator[ServerSentEvent]:
    """The job's progress, then its images or its error. If the stream ends before the
    job does (the client left, the server stops), the job is canceled."""
    job_id = watched.job.id
    try:
        async for event in job_events(services, job_id):
            watched.settled = watched.settled or event.type.is_terminal()
            if event.type is EventType.PROGRESS:
                yield _progress(event)
            elif event.type is EventType.COMPLETED:
                finished = await run_in_threadpool(services.broker.get, job_id)
                async for sse in _completes(services, finished):
                    yield sse
            elif event.type is EventType.FAILED:
                message = str(event.data.get("message") or "generation failed")
                yield _event("error", {"message": message, "code": event.data.get("code")})
            elif event.type is EventType.CANCELED:
                yield _event("error", {"message": f"job {job_id} was canceled"})
    except Exception as exc:  # e.g. the broker went away: an error event, not a reset
        log.exception("stream of job %s failed", job_id)
        yield _event("error", {"message": f"the stream of job {job_id} failed: {exc}"})
    finally:
        with anyio.CancelScope(shield=True):
            await _cancel_unfinished(services, watched)


async def _start(
    body: ExecuteRequest | Img2ImgRequest | InpaintRequest, task: Task, services: Services
) -> EventSourceResponse:
    """Validate and queue (a 422 before any stream), then stream the job."""
    watched = _Watched(await submit(await _spec(body, task, services), services))

    async def on_disconnect(_message: Message) -> None:
        await _cancel_unfinished(services, watched)

    return EventSourceResponse(
        _stream(services, watched),
        headers={"X-Job-Id": watched.job.id},
        client_close_handler_callable=on_disconnect,
    )


STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "progress*, complete | error"},
    422: {"description": '{"error": "...", "field": "..."}'},
}


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(render_error, names=NAMES)

    @router.post(
        "/execute",
        response_class=EventSourceResponse,
        responses=STREAM_RESPONSES,
        summary="Candle SD worker: text to image (SSE)",
    )
    async def candle_execute(body: ExecuteRequest, services: ServicesDep) -> EventSourceResponse:
        return await _start(body, Task.TEXT2IMG, services)

    @router.post(
        "/img2img",
        response_class=EventSourceResponse,
        responses=STREAM_RESPONSES,
        summary="Candle SD worker: image to image (SSE)",
    )
    async def candle_img2img(body: Img2ImgRequest, services: ServicesDep) -> EventSourceResponse:
        return await _start(body, Task.IMG2IMG, services)

    @router.post(
        "/inpaint",
        response_class=EventSourceResponse,
        responses=STREAM_RESPONSES,
        summary="Candle SD worker: inpainting (SSE)",
    )
    async def candle_inpaint(body: InpaintRequest, services: ServicesDep) -> EventSourceResponse:
        return await _start(body, Task.INPAINT, services)

    @router.get("/ready", summary="Candle SD worker: ready (the model is loaded)")
    def candle_ready(services: ServicesDep) -> JSONResponse:
        report = health_report(services)
        body: dict[str, Any] = {"ready": report.model_loaded}
        if not report.model_loaded:
            body["reason"] = "model loading" if report.status == "starting" else "no worker"
        body["timestamp"] = datetime.now(UTC).isoformat()
        return JSONResponse(body, status_code=200 if report.model_loaded else 503)

    if not at_root:  # at the root, the native /health (a superset) answers

        @router.get(
            "/health",
            response_model=Health,
            responses={503: {"model": Health}},
            summary="Candle SD worker: health (status, worker_id, model_version, device, "
            "uptime_seconds)",
        )
        def candle_health(services: ServicesDep) -> JSONResponse:
            report = health_report(services)
            return JSONResponse(
                report.model_dump(mode="json"),
                status_code=200 if report.status == "healthy" else 503,
            )

    return router
