"""AUTOMATIC1111's web UI API (`/sdapi/v1`), as clients such as webuiapi use it:
txt2img and img2img (inpainting with `mask`), progress, interrupt, options, the model,
sampler, LoRA and upscaler listings, extra-single-image (upscaling) and png-info.

Where it departs from A1111, and why:
- A request's images run as one job (batch_size x n_iter images, seeds seed + i), so
  `/skip` cannot skip one image: it interrupts, like `/interrupt`. An interrupted request
  answers 200 with the images it has (none) and `"interrupted": true` in `info`.
- `override_settings.sd_model_checkpoint` picks the model of that request only. POST
  /options stores defaults for later requests of this dialect in this API process,
  shared by all its callers (A1111's options are global too); nothing is switched or
  persisted, and other replicas do not see it: override_settings is the race-free way.
  Of the other options (GET /options lists them) none changes a job: outputs are PNG.
- `refiner_checkpoint` (any value) runs the deployment's refiner in ensemble mode,
  switching at `refiner_switch_at`; samplers: see a1111_spec.
- Progress (GET /progress, POST /internal/progress) knows the jobs that this API
  process took; with several API replicas, ask the one that took the request.
- Hires fix (`enable_hr`), scripts and a second upscaler are refused, naming the field;
  face restoration, tiling, styles, subseeds, eta/s_* and mask blur are accepted and
  not used. Fields left out take the model's defaults (not 512 px and 50 steps).
- Errors: 422 `{"detail": [{loc, msg, type}]}` for a bad field, else A1111's
  `{"error", "detail", "body", "errors"}`; an unknown sampler is a 404 as in A1111.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects import a1111_spec as spec_of
from sdworker.api.dialects.a1111_catalog import (
    CHECKPOINT,
    EMPTY_LISTS,
    cmd_flags,
    default_options,
    empty_list,
    loras,
    nothing,
    resolve_model,
    resolve_upscaler,
    samplers,
    schedulers,
    scripts,
    sd_models,
    upscalers,
)
from sdworker.api.dialects.a1111_models import (
    ExtrasSingleImageRequest,
    ExtrasSingleImageResponse,
    GenerationRequest,
    ImagesResponse,
    Img2ImgRequest,
    InternalProgressRequest,
    InternalProgressResponse,
    PngInfoRequest,
    PngInfoResponse,
    ProgressResponse,
    Txt2ImgRequest,
)
from sdworker.api.dialects.a1111_progress import (
    DialectState,
    Tracked,
    caller_of,
    fetch_jobs,
    newest_live,
    progress_body,
    task_progress,
)
from sdworker.api.dialects.base import (
    DialectError,
    StatusError,
    build_spec,
    dialect_router,
    fastapi_detail,
)
from sdworker.api.jobflow import asset_bytes, cancel_job, submit, wait_for
from sdworker.api.services import Services
from sdworker.errors import InvalidJobError
from sdworker.jobs import Job, JobSpec, JobStatus
from sdworker.settings import Settings

API = "/sdapi/v1"
# JobSpec field -> A1111's name, for error messages.
NAMES = {
    "num_images": "batch_size",
    "guidance_scale": "cfg_scale",
    "strength": "denoising_strength",
    "image": "init_images",
    "model": "override_settings.sd_model_checkpoint",
    "loras": "prompt",
    "refiner": "refiner_checkpoint",
    "high_noise_frac": "refiner_switch_at",
}
EXTRAS_NAMES = {"upscale_factor": "upscaling_resize", "upscaler": "upscaler_1"}
LORA_FIELD = re.compile(r"^loras\[\d+\](?:\.name)?")
ERROR_NAMES = {"job_failed": "RuntimeError", "timeout": "TimeoutError"}


def _lora_tag_field(error: DialectError) -> DialectError:
    """LoRAs come from <lora:...> tags: their errors name `prompt`."""
    if error.field is None or not LORA_FIELD.match(error.field):
        return error
    message = LORA_FIELD.sub("prompt", error.message, count=1)
    return DialectError(error.status, error.code, message, "prompt")


def render_error(error: DialectError) -> Response:
    """FastAPI's 422 list for a bad field; else A1111's api exception handler's body."""
    error = _lora_tag_field(error)
    if error.status == 422 and error.field:
        return fastapi_detail(error)
    name = ERROR_NAMES.get(error.code, "HTTPException")
    errors = error.message if name != "HTTPException" else f"{error.status}: {error.message}"
    body = {"error": name, "detail": error.message, "body": "", "errors": errors}
    return JSONResponse(body, status_code=error.status)


def _raw_base64(image: str) -> str:
    text = image.strip()
    return text.partition(",")[2] if text.startswith("data:") else text


def extras_spec(body: ExtrasSingleImageRequest, upscaler: str) -> JobSpec:
    if body.resize_mode != 0:
        raise InvalidJobError(
            "resize_mode: only 0 (scale by upscaling_resize) is supported", field="resize_mode"
        )
    if (body.upscaler_2 or "None") != "None" and body.extras_upscaler_2_visibility > 0:
        raise InvalidJobError("upscaler_2: a second upscaler is not supported", field="upscaler_2")
    factor = body.upscaling_resize
    if factor not in (2, 4):
        raise InvalidJobError(
            f"upscaling_resize: must be 2 or 4 here, not {factor:g}", field="upscaling_resize"
        )
    fields = {"task": "upscale", "image": _raw_base64(body.image), "upscale_factor": int(factor)}
    return build_spec(
        fields | {"upscaler": upscaler, "metadata": {"dialect": "a1111"}}, EXTRAS_NAMES
    )


async def _outputs(services: Services, job: Job) -> list[bytes]:
    if job.result is None:
        return []
    return [await asset_bytes(services, asset) for asset in job.result.assets]


class A1111Api:
    """The routes' handlers, sharing one app's DialectState."""

    def __init__(self, settings: Settings) -> None:
        self.state = DialectState(defaults=default_options(settings))

    async def run(self, services: Services, spec: JobSpec, request: Request, kind: str) -> Job:
        """Submit and wait; a canceled job is an answer, a failed one a 500."""
        job = await submit(spec, services)
        self.state.active[job.id] = Tracked(job.id, kind, caller_of(request))
        if spec.metadata.get("id_task"):
            self.state.remember_task(str(spec.metadata["id_task"]), job.id)
        try:
            waited = await wait_for(services, job, request=request)
        finally:
            self.state.active.pop(job.id, None)
        job = waited.job
        if waited.disconnected or job.status in (JobStatus.SUCCEEDED, JobStatus.CANCELED):
            return job
        if not waited.finished:
            timeout = services.settings.sync_timeout_s
            raise StatusError(
                504,
                f"{kind} timed out after {timeout:g} s; job {job.id} goes on "
                f"(GET /v1/jobs/{job.id})",
                code="timeout",
            )
        reason = job.error.message if job.error else job.status.value
        raise StatusError(500, f"{kind} failed (job {job.id}): {reason}", code="job_failed")

    def _model(self, services: Services, body: GenerationRequest, caller: str) -> str:
        """override_settings' checkpoint (this request only), else the caller's options'."""
        chosen = (body.override_settings or {}).get(CHECKPOINT)
        if chosen is None:
            options = self.state.options_of(caller)
            return resolve_model(services, options[CHECKPOINT], CHECKPOINT)
        return resolve_model(services, chosen, f"override_settings.{CHECKPOINT}")

    async def generate(
        self, body: GenerationRequest, request: Request, services: Services, kind: str
    ) -> ImagesResponse:
        metadata: dict[str, Any] = {"dialect": "a1111"}
        if body.force_task_id:
            metadata["id_task"] = body.force_task_id
        max_images = services.settings.max_num_images
        model = self._model(services, body, caller_of(request))
        # Decodes (and may invert) the mask: off the event loop.
        fields = await run_in_threadpool(
            spec_of.generation_fields, body, model, max_images, metadata
        )
        job = await self.run(services, build_spec(fields, NAMES), request, kind)
        data = await _outputs(services, job)
        pictures = [Image.open(io.BytesIO(item)) for item in data]
        parameters = body.model_dump(mode="json")
        if isinstance(body, Img2ImgRequest) and not body.include_init_images:
            parameters["init_images"] = parameters["mask"] = None
        interrupted = job.status is JobStatus.CANCELED
        return ImagesResponse(
            images=[base64.b64encode(item).decode() for item in data] if body.send_images else [],
            parameters=parameters,
            info=spec_of.info_json(body, job, pictures, interrupted=interrupted),
        )

    async def txt2img(
        self, body: Txt2ImgRequest, request: Request, services: ServicesDep
    ) -> ImagesResponse:
        """A1111: txt2img."""
        return await self.generate(body, request, services, "scripts_txt2img")

    async def img2img(
        self, body: Img2ImgRequest, request: Request, services: ServicesDep
    ) -> ImagesResponse:
        """A1111: img2img; inpainting with `mask` (white = repaint)."""
        return await self.generate(body, request, services, "scripts_img2img")

    async def progress(
        self,
        request: Request,
        services: ServicesDep,
        id_task: str | None = None,
        skip_current_image: bool = False,
    ) -> ProgressResponse:
        """The caller's newest running (else queued) request; `id_task`: that task's.
        No live previews (current_image is null)."""
        shown = self.state.shown_ids(id_task, caller_of(request))
        jobs = await run_in_threadpool(fetch_jobs, services, shown)
        job = newest_live(jobs)
        return progress_body(job, self.state.active.get(job.id) if job else None)

    async def internal_progress(
        self, body: InternalProgressRequest, services: ServicesDep
    ) -> InternalProgressResponse:
        """One task's progress by the force_task_id its request carried."""
        job_id = self.state.tasks.get(body.id_task or "")
        jobs = await run_in_threadpool(fetch_jobs, services, [job_id] if job_id else [])
        return task_progress(jobs[0] if jobs else None, body.id_live_preview)

    async def _interrupt(self, services: Services, caller: str) -> None:
        """Cancel the caller's running requests (queued ones run, as in A1111)."""
        mine = self.state.shown_ids(None, caller)
        jobs = await run_in_threadpool(fetch_jobs, services, mine)
        for job in jobs:
            tracked = self.state.active.get(job.id)
            if job.status is JobStatus.RUNNING and tracked is not None:
                tracked.interrupted = True
                await run_in_threadpool(cancel_job, services, job.id)

    async def interrupt(self, request: Request, services: ServicesDep) -> dict[str, Any]:
        """A1111: interrupt the caller's running request(s)."""
        await self._interrupt(services, caller_of(request))
        return {}

    async def skip(self, request: Request, services: ServicesDep) -> None:
        """A1111: skip; a request's images are one job here, so this interrupts it."""
        await self._interrupt(services, caller_of(request))

    def get_options(self, request: Request) -> dict[str, Any]:
        """A1111: the caller's options (sd_model_checkpoint: its default model)."""
        return dict(self.state.options_of(caller_of(request)))

    def set_options(self, body: dict[str, Any], request: Request, services: ServicesDep) -> None:
        """Defaults for the caller's later requests in this process (the options GET
        /options lists; others are ignored); override_settings is per request."""
        if body.get(CHECKPOINT) is not None:
            body[CHECKPOINT] = resolve_model(services, body[CHECKPOINT], CHECKPOINT)
        options = self.state.options_of(caller_of(request))
        options.update({k: v for k, v in body.items() if k in options})

    async def extra_single_image(
        self, body: ExtrasSingleImageRequest, request: Request, services: ServicesDep
    ) -> ExtrasSingleImageResponse:
        """A1111: upscale one image (upscaling_resize 2 or 4); upscaler_1 "None"
        answers the image unchanged, as A1111 does."""
        if not body.image:
            raise InvalidJobError("image: an image is required", field="image")
        upscaler = await run_in_threadpool(resolve_upscaler, services, body.upscaler_1)
        if upscaler is None:
            await run_in_threadpool(spec_of.decode_image, body.image, "image")
            return ExtrasSingleImageResponse(html_info="", image=_raw_base64(body.image))
        job = await self.run(services, extras_spec(body, upscaler), request, "extras")
        data = await _outputs(services, job)
        if not data:
            return ExtrasSingleImageResponse(html_info="<p>Interrupted</p>", image=None)
        info = f"<p>Postprocess upscale by: {body.upscaling_resize:g}, Postprocess upscaler: "
        return ExtrasSingleImageResponse(
            html_info=f"{info}{body.upscaler_1}</p>", image=base64.b64encode(data[0]).decode()
        )


def png_info(body: PngInfoRequest) -> PngInfoResponse:
    """A1111: the generation parameters an image carries (sdworker writes them)."""
    image = spec_of.decode_image(body.image, "image")
    text = spec_of.read_infotext(image) or ""
    return PngInfoResponse(
        info=text,
        items=spec_of.text_items(image),
        parameters=spec_of.parse_infotext(text) if text else {},
    )


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    """The routes; at_root changes nothing (A1111 has no /health or /status)."""
    api = A1111Api(settings)
    router = dialect_router(render_error, names=NAMES)
    routes: list[tuple[str, str, Any, Any]] = [
        ("POST", "/txt2img", api.txt2img, ImagesResponse),
        ("POST", "/img2img", api.img2img, ImagesResponse),
        ("GET", "/progress", api.progress, ProgressResponse),
        ("POST", "/interrupt", api.interrupt, None),
        ("POST", "/skip", api.skip, None),
        ("GET", "/options", api.get_options, None),
        ("POST", "/options", api.set_options, None),
        ("GET", "/sd-models", sd_models, None),
        ("GET", "/samplers", samplers, None),
        ("GET", "/schedulers", schedulers, None),
        ("GET", "/loras", loras, None),
        ("GET", "/upscalers", upscalers, None),
        ("GET", "/scripts", scripts, None),
        ("GET", "/cmd-flags", cmd_flags, None),
        ("POST", "/refresh-checkpoints", nothing, None),
        ("POST", "/refresh-loras", nothing, None),
        *(("GET", f"/{path}", empty_list, None) for path in EMPTY_LISTS),
    ]
    for method, path, endpoint, model in routes:
        summary = f"A1111: {path.lstrip('/')}"
        router.add_api_route(
            API + path, endpoint, methods=[method], response_model=model, summary=summary
        )
    router.add_api_route(
        "/internal/progress",
        api.internal_progress,
        methods=["POST"],
        response_model=InternalProgressResponse,
        summary="A1111: progress of one task (force_task_id)",
    )
    # Their input image is `image`, not init_images: errors name it so.
    extras = dialect_router(render_error, names=EXTRAS_NAMES)
    extras.add_api_route(
        f"{API}/extra-single-image",
        api.extra_single_image,
        methods=["POST"],
        response_model=ExtrasSingleImageResponse,
        summary="A1111: extra-single-image (upscale)",
    )
    extras.add_api_route(
        f"{API}/png-info",
        png_info,
        methods=["POST"],
        response_model=PngInfoResponse,
        summary="A1111: png-info",
    )
    router.include_router(extras)
    return router
