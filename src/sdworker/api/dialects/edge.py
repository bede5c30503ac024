"""The edge-function worker protocol (the LUSTIFY SDXL worker of a Supabase app): job
payloads `{id, type, prompt, user_id, config, metadata, compel_*}` arrive on a Redis list
(edge_queue.py) or by `POST /edge/jobs`; each becomes one job, and its end is POSTed to
the edge system's `job-callback` in that system's body (webhook_payloads.py).

Where it departs from the original worker, and why:
- config.steps/num_inference_steps, guidance_scale, resolution/width/height,
  negative_prompt and scheduler are used (the original ignored them for a fixed table);
  the job type only picks the preset (sdxl_image_fast 15 steps, sdxl_image_high 25 and
  the refiner when one is configured), and fields given win.
- config.num_images outside 1, 3, 6 is refused naming the field (the original silently
  made 1 image); a reference image that cannot be fetched fails the job (the original
  fell back to text-to-image). Strength is used as given (the original clamped it to
  0.10-0.25 and steps to 15-30: generation choices belong to the engine, not here).
- The queue is the Redis protocol (redis:// or rediss://, as Upstash serves too), not
  Upstash's REST API, and a job taken from it survives a crash (see edge_queue.py).
- Callbacks are signed (Standard Webhooks) and retried besides carrying the bearer
  token; asset keys are `{user_id}/{sdworker job id}/{i}.png` (the original used its own
  job id), and `url` is a full URL unless SDWORKER_EDGE_ASSET_URLS=key.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import (
    DialectError,
    build_spec,
    dialect_router,
    rename_field,
    rename_fields,
)
from sdworker.api.errors import status_of
from sdworker.api.jobflow import enqueue_job
from sdworker.api.routes.system import Health, health_report, status_report
from sdworker.api.services import Services
from sdworker.broker.records import spec_digest
from sdworker.errors import InvalidJobError, JobConflictError, SdworkerError
from sdworker.jobs import Job, JobSpec, WebhookFormat, describe_validation_error
from sdworker.settings import Settings
from sdworker.webhook_payloads import EDGE_STATUS, edge_payload_for, edge_rejection_payload
from sdworker.webhooks import TERMINAL_EVENTS

log = logging.getLogger(__name__)

JobType = Literal["sdxl_image_fast", "sdxl_image_high"]
EXAMPLE = {
    "id": "0f8e2c1a-5b7d-4c4e-9a55-1f7b2d3c4e5f",
    "type": "sdxl_image_fast",
    "prompt": "a lighthouse at dusk, oil painting",
    "user_id": "3b6f0e2a-9d1c-4f7e-8a2b-5c4d3e2f1a0b",
    "config": {"num_images": 3, "resolution": "1024x1024", "seed": 42},
    "metadata": {},
}


class EdgeConfig(BaseModel):
    """The payload's `config`; the edge function sends more keys, which are ignored."""

    model_config = ConfigDict(extra="ignore")

    num_images: Literal[1, 3, 6] = 1
    steps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    negative_prompt: str | None = None
    scheduler: str | None = None
    # Some edge-function versions put these here instead of metadata / the top level.
    reference_image_url: str | None = None
    reference_strength: float | None = None
    reference_type: str | None = None
    compel_enabled: bool | None = None
    compel_weights: str | None = None


class EdgeMetadata(BaseModel):
    """The payload's `metadata` (the app's job metadata besides these: ignored)."""

    model_config = ConfigDict(extra="ignore")

    reference_image_url: str | None = None
    denoise_strength: float | None = None
    reference_strength: float | None = Field(
        default=None, description="Deprecated: denoise strength = 1 - reference_strength."
    )
    exact_copy_mode: bool | None = None
    reference_type: str | None = None


class EdgePayload(BaseModel):
    """One job payload as the edge function queues it."""

    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)

    id: str = Field(min_length=1, max_length=255)
    type: JobType | None = None
    job_type: JobType | None = Field(default=None, description="Older name of `type`.")
    prompt: str
    user_id: str | None = Field(default=None, description="Owns the images (storage keys).")
    config: EdgeConfig = Field(default_factory=EdgeConfig)
    metadata: EdgeMetadata = Field(default_factory=EdgeMetadata)
    negative_prompt: str | None = None
    compel_enabled: bool | None = None
    compel_weights: str | None = None
    seed: int | None = None
    reference_image_url: str | None = None
    reference_strength: float | None = None

    @property
    def kind(self) -> str | None:
        return self.type or self.job_type


class EdgeAccepted(BaseModel):
    job_id: str = Field(description="The payload's id (the edge system's job id).")
    sdworker_job_id: str
    status: str = Field(description="queued, processing, completed or failed.")


def render_error(error: DialectError) -> Response:
    """sdworker's native error shape; loc is the payload's path, e.g. body.config.num_images."""
    loc = ["body", *error.field.split(".")] if error.field else ["body"]
    body = {
        "detail": [{"loc": loc, "msg": error.message, "type": error.code}],
        "error": {"code": error.code, "message": error.message},
    }
    return JSONResponse(body, status_code=error.status)


def parse_payload(data: Any) -> EdgePayload:
    """The payload, or InvalidJobError naming its field path (config.num_images)."""
    try:
        payload = EdgePayload.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        raise InvalidJobError(describe_validation_error(exc), field=field or None) from None
    if payload.kind is None:
        raise InvalidJobError(
            "type: required, one of sdxl_image_fast, sdxl_image_high", field="type"
        )
    return payload


def _pick(*candidates: tuple[str, Any]) -> tuple[str, Any]:
    """The first given value (empty text counts as not given) and the path it came from."""
    for path, value in candidates:
        if value is not None and value != "":
            return path, value
    return candidates[0][0], None


@dataclass(frozen=True)
class Translation:
    fields: dict[str, Any]
    names: dict[str, str]  # JobSpec field -> the payload path it came from


def translate(payload: EdgePayload, settings: Settings) -> Translation:
    """The payload as JobSpec fields, each with the path it came from."""
    config, meta = payload.config, payload.metadata
    picks: dict[str, tuple[str, Any]] = {
        "preset": _pick(("type", payload.type), ("job_type", payload.job_type)),
        "prompt": ("prompt", payload.prompt),
        "negative_prompt": _pick(
            ("config.negative_prompt", config.negative_prompt),
            ("negative_prompt", payload.negative_prompt),
        ),
        "num_images": ("config.num_images", config.num_images),
        "steps": _pick(
            ("config.steps", config.steps),
            ("config.num_inference_steps", config.num_inference_steps),
        ),
        "guidance_scale": ("config.guidance_scale", config.guidance_scale),
        "size": _pick(("config.resolution", config.resolution)),
        "width": ("config.width", config.width),
        "height": ("config.height", config.height),
        "seed": _pick(("config.seed", config.seed), ("seed", payload.seed)),
        "scheduler": _pick(("config.scheduler", config.scheduler)),
        "compel_enabled": _pick(
            ("compel_enabled", payload.compel_enabled),
            ("config.compel_enabled", config.compel_enabled),
        ),
        "compel_weights": _pick(
            ("compel_weights", payload.compel_weights),
            ("config.compel_weights", config.compel_weights),
        ),
    }
    image = _pick(
        ("metadata.reference_image_url", meta.reference_image_url),
        ("config.reference_image_url", config.reference_image_url),
        ("reference_image_url", payload.reference_image_url),
    )
    if image[1] is not None:  # the reference fields mean nothing without an image
        picks |= _reference_picks(payload) | {"image": image}
    names = {field: path for field, (path, _) in picks.items()}
    if picks["size"][1] is not None:
        names |= {"width": "config.resolution", "height": "config.resolution"}
    fields = {field: value for field, (_, value) in picks.items() if value is not None}
    # A job that fails later (an unreachable image) names the payload's field too.
    given = {field: names[field] for field in fields if names.get(field, field) != field}
    target = settings.edge_callback_target
    fields |= {
        "metadata": {
            "user_id": payload.user_id,
            "edge": {"job_id": payload.id, "type": payload.kind, "fields": given},
        },
        "webhook": target,
        # Without a callback target the native webhook (if any) keeps its own format.
        "webhook_format": WebhookFormat.EDGE if target else WebhookFormat.NATIVE,
    }
    return Translation(fields, names)


def _reference_picks(payload: EdgePayload) -> dict[str, tuple[str, Any]]:
    config, meta = payload.config, payload.metadata
    kind = _pick(
        ("metadata.reference_type", meta.reference_type),
        ("config.reference_type", config.reference_type),
    )
    if isinstance(kind[1], str) and kind[1].strip().lower() == "none":
        kind = (kind[0], None)  # the app's way of saying "no reference type"
    legacy = _pick(
        ("metadata.reference_strength", meta.reference_strength),
        ("config.reference_strength", config.reference_strength),
        ("reference_strength", payload.reference_strength),
    )
    # The strength is 1 - reference_strength when only that is given: name it then.
    strength_path = "metadata.denoise_strength"
    if meta.denoise_strength is None and legacy[1] is not None:
        strength_path = legacy[0]
    return {
        "strength": (strength_path, meta.denoise_strength),
        "reference_strength": legacy,
        "exact_copy_mode": ("metadata.exact_copy_mode", meta.exact_copy_mode),
        "reference_type": kind,
    }


def idempotency_key(payload: EdgePayload) -> str:
    """A re-delivered payload (same id) is the same job."""
    return f"edge:{payload.id}"


def accept_payload(data: Any, services: Services) -> tuple[EdgePayload, Job, bool]:
    """Parse, translate, validate and queue one payload (blocking: call from a thread).
    Errors name the payload's field path."""
    payload = parse_payload(data)
    translation = translate(payload, services.settings)
    spec: JobSpec = build_spec(translation.fields, translation.names)
    key = idempotency_key(payload)
    earlier = services.broker.find(key)
    if earlier is not None and spec_digest(earlier.spec) == spec_digest(spec):
        # Re-driven or re-posted: the job exists. Validating again would fetch its
        # reference image again, and a URL that has expired since must not turn an
        # accepted job into a "refused" callback.
        return payload, earlier, False
    try:
        job, created = enqueue_job(spec, services, key)
    except SdworkerError as exc:  # validate_job's words are JobSpec's: use the payload's
        exc.message = rename_fields(exc.message, translation.names)
        exc.field = rename_field(exc.field, translation.names)
        raise
    return payload, job, created


def _payload_id(data: Any) -> str | None:
    """The edge job id of a payload that did not parse, when it has one."""
    if isinstance(data, Mapping):
        value = data.get("id") or data.get("job_id")
        if isinstance(value, str | int) and not isinstance(value, bool):
            return str(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def queue_handler(services: Services) -> Callable[[bytes], None]:
    """What the Redis list consumer does with each item: queue its job, or report it
    refused (a failed callback naming the field) and drop it. Raises only when the job
    queue itself fails, so the consumer keeps the item and tries again."""
    settings = services.settings

    def reject(data: Any, message: str) -> None:
        edge_id, target = _payload_id(data), settings.edge_callback_target
        log.warning("refused edge job %s: %s", edge_id, message)
        if edge_id is None or target is None:
            return  # nobody to tell: the refusal is only logged
        kind = (data.get("type") or data.get("job_type")) if isinstance(data, Mapping) else None
        body = edge_rejection_payload(edge_id, _text(kind), message, settings.worker_id)
        services.webhooks.send_edge(target, f"edge.{edge_id}.refused", body)

    def handle(raw: bytes) -> None:
        try:
            data = json.loads(raw)
        except ValueError as exc:  # not JSON, or not UTF-8
            log.error("dropped an edge queue item that is not JSON (%s): %.200r", exc, raw)
            return
        try:
            payload, job, created = accept_payload(data, services)
        except JobConflictError as exc:  # the earlier job with this id stands
            log.error("dropped a changed re-delivery of edge job %s: %s", _payload_id(data), exc)
            return
        except SdworkerError as exc:
            if status_of(exc) >= 500:
                raise
            reject(data, exc.message)
            return
        log.info("edge job %s is job %s (%s)", payload.id, job.id, job.status.value)
        ended = TERMINAL_EVENTS.get(job.status)
        if not created and ended is not None:
            # Re-pushed after it ended (its callback may have been lost): report it again.
            services.webhooks.notify(job, ended)

    return handle


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(render_error)

    @router.post(
        "/jobs",
        status_code=202,
        response_model=EdgeAccepted,
        summary="Edge worker: queue a job payload (as the edge function LPUSHes it)",
    )
    async def edge_submit(
        payload: Annotated[dict[str, Any], Body(examples=[EXAMPLE])], services: ServicesDep
    ) -> EdgeAccepted:
        """Same payload, same job (its id is the idempotency key); the job's end is POSTed
        to the edge callback (SDWORKER_EDGE_CALLBACK_URL or SUPABASE_URL)."""
        parsed, job, _ = await run_in_threadpool(accept_payload, payload, services)
        return EdgeAccepted(
            job_id=parsed.id, sdworker_job_id=job.id, status=EDGE_STATUS[job.status]
        )

    @router.get("/jobs/{job_id}", summary="Edge worker: a job in the callback's body")
    async def edge_job(job_id: str, services: ServicesDep) -> dict[str, Any]:
        """By sdworker job id (`sdworker_job_id`): what the callback carries (or will)."""
        job = await run_in_threadpool(services.broker.get, job_id)
        return edge_payload_for(job, services.settings)

    if not at_root:  # at the root, the native /health and /status answer (a superset)

        @router.get("/health", response_model=Health, summary="Edge worker: health")
        def edge_health(services: ServicesDep) -> JSONResponse:
            report = health_report(services)
            status = 200 if report.status == "healthy" else 503
            return JSONResponse(report.model_dump(mode="json"), status_code=status)

        @router.get("/status", summary="Edge worker: status (worker_type, batch_support...)")
        def edge_status(services: ServicesDep) -> dict[str, Any]:
            return status_report(services)

    return router
