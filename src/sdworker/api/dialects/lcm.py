"""The LCM server's protocol (Dream Lab's lcm_sr_server): `POST /generate` answers with
the image bytes (seed in `X-Seed`), `POST /superres` upscales an uploaded image.

Its `mode` names a model of the registry; with SDWORKER_LCM_LORA set, jobs use the
`lcm` preset (LCM-LoRA and the LCM scheduler), as that server ran LCM models. Its
super-resolution ran a 3x model per pass; sdworker upscales 2x per pass, so magnitude 1
is 2x and 2 is 4x (3 is refused, naming the allowed values).
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import (
    StatusError,
    build_spec,
    dialect_router,
    fastapi_detail,
    run_to_end,
)
from sdworker.api.jobflow import asset_bytes
from sdworker.api.services import Services
from sdworker.errors import InvalidJobError
from sdworker.jobs import Job, JobSpec
from sdworker.settings import Settings

SCALE_PER_PASS = 2
MAX_PASSES = 2  # 2x per pass: 1 -> 2x, 2 -> 4x (sdworker's upscale factors)
STYLE_OFF = {"", "none", "off"}
# JobSpec field -> this protocol's name, for error messages.
NAMES = {
    "steps": "num_inference_steps",
    "width": "size",
    "height": "size",
    "style": "style_lora",
    "model": "mode",
    "image": "file",
}


class StyleLora(BaseModel):
    style: str | None = None
    level: int = Field(default=0, ge=0, le=8, description="0 = off.")


class GenerateRequest(BaseModel):
    """The LCM server's body; unknown fields are ignored as that server did."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    mode: str | None = Field(default=None, description="A model name of the registry.")
    size: str = Field(default="512x512", pattern=r"^\d+x\d+$")
    num_inference_steps: int = Field(default=4, ge=1, le=50)
    guidance_scale: float = Field(default=1.0, ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    style_lora: StyleLora = Field(default_factory=StyleLora)
    superres: bool = False
    superres_format: Literal["png", "jpeg"] = "png"
    superres_quality: int = Field(default=92, ge=1, le=100, description="JPEG quality.")
    superres_magnitude: int = Field(default=2, ge=1, le=3)


def _passes(magnitude: int, field: str) -> int:
    if magnitude > MAX_PASSES:
        raise InvalidJobError(
            f"{field} must be 1 (2x) or 2 (4x) here, not {magnitude}: sdworker upscales "
            f"{SCALE_PER_PASS}x per pass",
            field=field,
        )
    return magnitude


def generate_spec(body: GenerateRequest, settings: Settings) -> JobSpec:
    style = body.style_lora
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "model": body.mode,
        "size": body.size,
        "steps": body.num_inference_steps,
        "guidance_scale": body.guidance_scale,
        "seed": body.seed,
    }
    if settings.lcm_lora:
        fields["preset"] = "lcm"
    if style.style is not None and style.style.strip().lower() not in STYLE_OFF and style.level:
        fields["style"] = {"name": style.style, "level": style.level}
    if body.superres:
        _passes(body.superres_magnitude, "superres_magnitude")
    return build_spec(fields, NAMES)


async def _finished(services: Services, spec: JobSpec, request: Request, what: str) -> Job:
    """Run a job to its end; a failure or timeout is this protocol's 500/504."""
    return await run_to_end(services, spec, request, what)


def _upscale_spec(image: bytes, passes: int, out_format: str, quality: int, owner: Any) -> JobSpec:
    return build_spec(
        {
            "task": "upscale",
            "image": base64.b64encode(image).decode(),
            "upscale_factor": SCALE_PER_PASS**passes,
            "output_format": out_format,
            "output_quality": quality,
            "metadata": owner,
        },
        NAMES | {"output_quality": "quality"},
    )


def _image_response(job: Job, data: bytes, headers: dict[str, str]) -> Response:
    assert job.result is not None
    asset = job.result.assets[0]
    base = {"Cache-Control": "no-store", "X-Job-Id": job.id, "X-LCM-Image-Key": asset.key}
    return Response(data, media_type=asset.content_type, headers=base | headers)


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(fastapi_detail, names=NAMES)

    @router.post(
        "/generate",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}, "description": "The image bytes."}},
        summary="LCM server: generate (image bytes, seed in X-Seed)",
    )
    async def lcm_generate(
        body: GenerateRequest, request: Request, services: ServicesDep
    ) -> Response:
        spec = generate_spec(body, services.settings)
        job = await _finished(services, spec, request, "Generation job")
        assert job.result is not None
        data = await asset_bytes(services, job.result.assets[0])
        headers = {"X-Seed": str(job.result.seeds[0]), "X-SuperRes": "0"}
        if body.superres:
            passes = body.superres_magnitude
            upscale = _upscale_spec(
                data, passes, body.superres_format, body.superres_quality, spec.metadata
            )
            job = await _finished(services, upscale, request, "Super-resolution job")
            assert job.result is not None
            data = await asset_bytes(services, job.result.assets[0])
            headers |= _sr_headers(job, passes) | {"X-SuperRes": "1"}
        return _image_response(job, data, headers)

    async def superres(
        request: Request,
        services: ServicesDep,
        file: Annotated[UploadFile, File(description="The image to upscale.")],
        magnitude: Annotated[int, Form(ge=1, le=3, description="Passes: 1 = 2x, 2 = 4x.")] = 2,
        out_format: Annotated[Literal["png", "jpeg"], Form()] = "png",
        quality: Annotated[int, Form(ge=1, le=100, description="JPEG quality.")] = 92,
    ) -> Response:
        """LCM server: upscale an uploaded image (multipart `file`)."""
        image = await file.read()
        if not image:
            raise StatusError(400, "Empty upload", field="file")
        passes = _passes(magnitude, "magnitude")
        job = await _finished(
            services,
            _upscale_spec(image, passes, out_format, quality, {}),
            request,
            "Super-resolution job",
        )
        assert job.result is not None
        data = await asset_bytes(services, job.result.assets[0])
        headers = _sr_headers(job, passes) | {"X-SR-Magnitude": str(magnitude)}
        return _image_response(job, data, headers)

    for path in ("/superres", "/v1/superres"):
        router.add_api_route(
            path,
            superres,
            methods=["POST"],
            response_class=Response,
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}}}},
            summary="LCM server: super-resolution",
        )

    if not at_root:  # at the root, the native /health answers

        @router.get("/health", summary="LCM server: health")
        def lcm_health() -> dict[str, str]:
            return {"status": "ok"}

    return router


def _sr_headers(job: Job, passes: int) -> dict[str, str]:
    upscaler = job.spec.upscaler or "lanczos"
    return {
        "X-SR-Model": upscaler,
        "X-SR-Passes": str(passes),
        "X-SR-Scale-Per-Pass": str(SCALE_PER_PASS),
        "X-SR-Format": job.spec.output_format.value,
    }
