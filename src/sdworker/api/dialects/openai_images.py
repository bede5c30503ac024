"""The OpenAI Images API: `POST /v1/images/generations` (JSON) and `POST /v1/images/edits`
(multipart), answered in OpenAI's shapes, so the `openai` SDK and apps written for it
work against sdworker by changing the base URL.

Where it departs from OpenAI, and why:
- model: OpenAI's names (dall-e-*, gpt-image-*, chatgpt-image-*) run the default model;
  any other name is a model of this server (model registry, model root).
- quality: low halves the model's steps; high/hd/xhigh/max add the refiner when one is
  configured (preset sdxl_image_high at the model's own steps), else take 1.5x the steps;
  standard/medium/auto keep the model's defaults. Few-step (Turbo/LCM) models ignore it.
- response_format: as asked; by default b64_json for gpt-image models (the only form
  OpenAI returns for them), url otherwise. A url is the stored asset's, and does not
  expire (OpenAI's last an hour).
- size: auto, or any WIDTHxHEIGHT the model takes (multiples of 8), not only OpenAI's.
  n: 1..SDWORKER_MAX_NUM_IMAGES for every model (dall-e-3 takes only 1).
- edits: one image (several are refused: no multi-image editing). No mask: img2img at
  strength 0.6 (0.4 with input_fidelity=high). A mask (PNG, transparent = edit, OpenAI's
  convention; sdworker's masks are white = repaint): inpainting. For dall-e-2 (OpenAI's
  default) an image's own transparent pixels are the mask when none is sent, as DALL-E 2
  did. The output keeps the input's size (fitted to the model's bounds) unless `size` says.
- background=transparent and stream=true are refused (no alpha output, no partial
  images); output_compression is the JPEG/WEBP quality (100: best, OpenAI's default);
  moderation and style are accepted and change nothing.
  No token `usage` is reported: diffusion has no tokens.
- Extensions (the SDK's extra_body): seed, steps, negative_prompt, guidance_scale,
  scheduler, strength. The `x-request-id` header is the sdworker job id (`_request_id`).
- Errors: OpenAI's shape; bad input is 400 (not 422), a failed job a 500 server_error
  carrying the job's message, a timeout 504.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects.base import (
    DialectError,
    StatusError,
    build_spec,
    dialect_router,
    run_to_end,
)
from sdworker.api.jobflow import asset_base64
from sdworker.api.services import Services
from sdworker.errors import InputImageError, ModelLoadError, ModelNotFoundError
from sdworker.families import FamilyProfile
from sdworker.fetch import decode_image, require_same_size
from sdworker.jobs import MAX_STEPS, Job
from sdworker.media import data_uri
from sdworker.options import Preset
from sdworker.planning import Features
from sdworker.settings import Settings

OPENAI_MODEL_PREFIXES = ("dall-e-", "gpt-image-", "chatgpt-image-")
B64_MODEL_PREFIXES = ("gpt-image-", "chatgpt-image-")  # OpenAI answers these in base64 only
OPENAI_MODELS_HINT = "dall-e-2, dall-e-3, gpt-image-1, gpt-image-1-mini"
OPENAI_SIZES = ("256x256", "512x512", "1024x1024", "1792x1024", "1024x1792", "1536x1024")
HIGH_QUALITY = frozenset({"hd", "high", "xhigh", "max"})
EDIT_STRENGTH = 0.6  # keeps the input's composition and colours, visibly follows the prompt
HIGH_FIDELITY_STRENGTH = 0.4
# JobSpec field -> OpenAI's name, for error messages.
NAMES = {"num_images": "n", "width": "size", "height": "size", "metadata": "user"}
CODES = {"invalid_request": "invalid_value", "invalid_input_image": "invalid_image"}
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")

Quality = Literal["standard", "hd", "low", "medium", "high", "xhigh", "max", "auto"]


class ImageOptions(BaseModel):
    """The fields generations and edits share: OpenAI's, then sdworker's extensions.
    Other fields are refused as OpenAI does ('Unrecognized request argument')."""

    model_config = ConfigDict(extra="allow")

    prompt: str | None = None
    model: str | None = Field(default=None, description="OpenAI's names run the default model.")
    n: int | None = Field(default=None, description="1..SDWORKER_MAX_NUM_IMAGES.")
    size: str | None = Field(default=None, description='"auto" or "WIDTHxHEIGHT".')
    quality: Quality | None = None
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: int | None = Field(
        default=None, ge=0, le=100, description="JPEG/WEBP: 100 = best quality (default)."
    )
    background: Literal["transparent", "opaque", "auto"] | None = None
    moderation: Literal["low", "auto"] | None = Field(default=None, description="No effect.")
    user: str | None = Field(default=None, description="Owns the assets (metadata.user_id).")
    safety_identifier: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(default=None, ge=0, le=3)
    seed: int | None = Field(default=None, description="sdworker: image i uses seed + i.")
    steps: int | None = Field(default=None, description="sdworker: beats `quality`.")
    negative_prompt: str | None = Field(default=None, description="sdworker.")
    guidance_scale: float | None = Field(default=None, description="sdworker.")
    scheduler: str | None = Field(default=None, description="sdworker.")


class GenerateRequest(ImageOptions):
    style: Literal["vivid", "natural"] | None = Field(default=None, description="No effect.")


class EditOptions(ImageOptions):
    input_fidelity: Literal["high", "low"] | None = Field(
        default=None, description="high: img2img strength 0.4 instead of 0.6."
    )
    strength: float | None = Field(default=None, description="sdworker: denoise strength.")


@dataclass(frozen=True)
class Target:
    """The model a request runs on: JobSpec's name (None: the default), the OpenAI name
    asked for (None: a model of this server), and what the model offers."""

    spec_model: str | None
    openai_model: str | None
    family: FamilyProfile
    features: Features


def render_error(error: DialectError) -> Response:
    """OpenAI's error object; validation is a 400 there, not a 422."""
    status = 400 if error.status == 422 else error.status
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = {
        "message": error.message,
        "type": kind,
        "param": error.field,
        "code": CODES.get(error.code, error.code),
    }
    return JSONResponse({"error": body}, status_code=status)


def _invalid(field: str, message: str, code: str = "invalid_value") -> StatusError:
    return StatusError(400, message, code=code, field=field)


def _check_common(options: ImageOptions, settings: Settings) -> tuple[str, int]:
    """The prompt and n, after OpenAI's own checks; refuses what cannot be honoured."""
    for name in options.model_extra or {}:
        raise _invalid(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")
    if options.prompt is None:
        raise _invalid(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    if not options.prompt.strip():
        raise _invalid(
            "prompt", "Invalid 'prompt': empty string; describe the image.", "empty_string"
        )
    n = 1 if options.n is None else options.n
    if not 1 <= n <= settings.max_num_images:
        raise _invalid(
            "n",
            f"Invalid 'n': {n}; it must be from 1 to {settings.max_num_images} "
            "(SDWORKER_MAX_NUM_IMAGES).",
            "integer_above_max_value" if n > 1 else "integer_below_min_value",
        )
    if options.stream:
        raise _invalid("stream", "stream=true is not supported here: leave it out or false.")
    if options.background == "transparent":
        raise _invalid(
            "background",
            "background 'transparent' is not supported here (outputs have no alpha); "
            "use 'opaque' or 'auto'.",
        )
    return options.prompt, n


async def _target(services: Services, name: str | None) -> Target:
    """OpenAI's names run the default model (unless the registry names one so); another
    name must be a model of this server."""
    openai_name = name if name and name.startswith(OPENAI_MODEL_PREFIXES) else None
    spec_model = None if not name or (openai_name and name not in services.models) else name

    def look_up() -> Target:
        return Target(
            spec_model,
            openai_name,
            services.family_of(spec_model),
            services.features_of(spec_model),
        )

    try:
        return await run_in_threadpool(look_up)
    except (ModelNotFoundError, ModelLoadError) as exc:
        served = ", ".join([services.settings.model, *sorted(services.models)])
        raise _invalid(
            "model",
            f"Invalid 'model': {name!r} is not served here. Use one of: {served}, or an "
            f"OpenAI model name ({OPENAI_MODELS_HINT}), which runs the default model "
            f"{services.settings.model}. ({exc.message})",
            "model_not_found",
        ) from None


def _size(raw: str | None, family: FamilyProfile) -> tuple[int, int] | None:
    """(width, height) of a WIDTHxHEIGHT size; None for auto or no size."""
    if raw is None or raw.strip().lower() == "auto":
        return None
    match = _SIZE_RE.match(raw.strip().lower())
    multiple, low, high = family.size_multiple, family.min_side, family.max_side
    sides = (int(match[1]), int(match[2])) if match else (0, 0)
    if not match or any(side % multiple or not low <= side <= high for side in sides):
        raise _invalid(
            "size",
            f"Invalid 'size': {raw!r}. Use 'auto' or WIDTHxHEIGHT with width and height "
            f"multiples of {multiple} from {low} to {high}, e.g. {', '.join(OPENAI_SIZES)}.",
        )
    return sides


def _quality_fields(quality: str | None, target: Target) -> dict[str, Any]:
    """low: half the steps; high/hd: the refiner when configured, else 1.5x the steps."""
    features = target.features
    if quality is None or features.variant != "standard":
        return {}  # a few-step model's steps are fixed by its distillation
    base = features.model_defaults.steps or target.family.default_steps
    if quality == "low":
        return {"steps": max(1, base // 2)}
    if quality in HIGH_QUALITY and features.refiner:
        return {"preset": Preset.SDXL_IMAGE_HIGH.value, "steps": base}
    if quality in HIGH_QUALITY:
        return {"steps": min(MAX_STEPS, base * 3 // 2)}
    return {}


def _job_fields(options: ImageOptions, target: Target, prompt: str, n: int) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": target.spec_model,
        "prompt": prompt,
        "num_images": n,
        "output_format": options.output_format or "png",
        **_quality_fields(options.quality, target),
    }
    if options.output_compression is not None:
        fields["output_quality"] = max(1, options.output_compression)
    user = options.user or options.safety_identifier
    if user:
        fields["metadata"] = {"user_id": user}
    for name in ("seed", "steps", "negative_prompt", "guidance_scale", "scheduler"):
        if getattr(options, name) is not None:
            fields[name] = getattr(options, name)
    return fields


async def _finished(services: Services, fields: dict[str, Any], request: Request) -> Job:
    """Run a job to its end; a failure is OpenAI's 500 server_error, a timeout a 504."""
    spec = build_spec(fields, NAMES)
    return await run_to_end(services, spec, request, "The image job", failed_code="server_error")


async def _reply(
    services: Services, job: Job, options: ImageOptions, target: Target
) -> JSONResponse:
    """OpenAI's ImagesResponse, plus the cheap gpt-image fields (size, quality, ...)."""
    assert job.result is not None
    default = "b64_json" if (target.openai_model or "").startswith(B64_MODEL_PREFIXES) else "url"
    as_base64 = (options.response_format or default) == "b64_json"
    data: list[dict[str, str]] = []
    for asset in job.result.assets:
        item = (
            {"b64_json": await asset_base64(services, asset)} if as_base64 else {"url": asset.url}
        )
        if target.openai_model == "dall-e-3":  # OpenAI reports its rewrite; ours is none
            item["revised_prompt"] = job.spec.prompt
        data.append(item)
    first = job.result.assets[0].metadata
    quality = options.quality or "auto"
    body: dict[str, Any] = {
        "created": int(job.created_at.timestamp()),
        "data": data,
        "background": "opaque",
        "output_format": job.spec.output_format.value,
        "size": f"{first.get('width')}x{first.get('height')}",
        "quality": "high" if quality in HIGH_QUALITY else "low" if quality == "low" else "medium",
    }
    return JSONResponse(body, headers={"x-request-id": job.id})


@dataclass(frozen=True)
class EditInputs:
    image: Image.Image  # RGB
    mask: Image.Image | None  # L, white = repaint


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_uri("image/png", buffer.getvalue())


def _transparent(image: Image.Image) -> Image.Image | None:
    """sdworker's mask (white = repaint) from an image's fully transparent pixels; None
    when it has none."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return None
    alpha = image.convert("RGBA").getchannel("A")
    mask = alpha.point(lambda a: 255 if a == 0 else 0)
    return mask if mask.getextrema()[1] else None


def _edit_inputs(image_data: bytes, mask_data: bytes | None, alpha_is_mask: bool) -> EditInputs:
    """Decode the upload(s); OpenAI's mask (transparent = edit) becomes sdworker's."""
    image = decode_image(image_data, field="image")
    if mask_data is None:
        return EditInputs(image.convert("RGB"), _transparent(image) if alpha_is_mask else None)
    upload = decode_image(mask_data, field="mask")
    mask = _transparent(upload)
    if mask is None:
        raise InputImageError(
            "mask: no fully transparent pixels; a mask is a PNG with an alpha channel whose "
            "transparent (alpha 0) pixels mark where to edit",
            field="mask",
        )
    require_same_size(image, mask)
    return EditInputs(image.convert("RGB"), mask)


def _fitted(width: int, height: int, family: FamilyProfile) -> tuple[int, int]:
    """The input's size within the model's bounds (aspect kept), in its size multiple."""
    low, high, multiple = family.min_side, family.max_side, family.size_multiple
    scale = min(1.0, high / max(width, height))
    scale = max(scale, low / min(width, height))

    def side(value: int) -> int:
        return min(high, max(low, round(value * scale / multiple) * multiple))

    return side(width), side(height)


FILE_FIELDS = ("image", "image[]", "mask")


async def _read_edit_form(request: Request) -> tuple[EditOptions, bytes, bytes | None]:
    """The multipart form: options validated as the JSON route's, one image, a mask."""
    async with request.form() as form:  # closes the spooled uploads
        items = form.multi_items()
        images = [value for key, value in items if key in ("image", "image[]")]
        masks = [value for key, value in items if key == "mask"]
        fields = {key: value for key, value in items if key not in FILE_FIELDS}
        try:
            options = EditOptions.model_validate(fields)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        image, mask = _one_image(images), _one_mask(masks)
        mask_data = await mask.read() if mask is not None else None
        return options, await image.read(), mask_data


def _one_image(images: list[UploadFile | str]) -> UploadFile:
    if not images:
        raise _invalid(
            "image",
            "Missing required parameter: 'image' (a file in a multipart/form-data body).",
            "missing_required_parameter",
        )
    if len(images) > 1:
        raise _invalid(
            "image", f"{len(images)} images sent; this server edits one image per request."
        )
    if not isinstance(images[0], UploadFile):
        raise _invalid("image", "'image' must be a file upload, not a text field.")
    return images[0]


def _one_mask(masks: list[UploadFile | str]) -> UploadFile | None:
    if not masks:
        return None
    mask = masks[0]
    if len(masks) > 1 or not isinstance(mask, UploadFile):
        raise _invalid("mask", "'mask' must be one file upload (a PNG with transparency).")
    return mask


def _edit_openapi() -> dict[str, Any]:
    schema = EditOptions.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {"image": binary, "mask": binary, **schema["properties"]}
    schema["required"] = ["image", "prompt"]
    content = {"multipart/form-data": {"schema": schema}}
    return {"requestBody": {"required": True, "content": content}}


def build_router(settings: Settings, at_root: bool) -> APIRouter:
    router = dialect_router(render_error, names=NAMES)

    @router.post("/v1/images/generations", summary="OpenAI Images: create images")
    async def openai_generate(
        body: GenerateRequest, request: Request, services: ServicesDep
    ) -> JSONResponse:
        prompt, n = _check_common(body, services.settings)
        target = await _target(services, body.model)
        fields = _job_fields(body, target, prompt, n)
        size = _size(body.size, target.family)
        if size is not None:
            fields["width"], fields["height"] = size
        job = await _finished(services, fields, request)
        return await _reply(services, job, body, target)

    @router.post(
        "/v1/images/edits",
        summary="OpenAI Images: edit an image (img2img, or inpaint with a mask)",
        openapi_extra=_edit_openapi(),
    )
    async def openai_edit(request: Request, services: ServicesDep) -> JSONResponse:
        options, image_data, mask_data = await _read_edit_form(request)
        prompt, n = _check_common(options, services.settings)
        target = await _target(services, options.model)
        alpha_is_mask = target.openai_model in (None, "dall-e-2") and target.spec_model is None
        inputs = await run_in_threadpool(_edit_inputs, image_data, mask_data, alpha_is_mask)
        fields = _job_fields(options, target, prompt, n)
        size = _size(options.size, target.family) or _fitted(*inputs.image.size, target.family)
        fields["width"], fields["height"] = size
        fields["image"] = await run_in_threadpool(_png_uri, inputs.image)
        if inputs.mask is not None:
            fields["mask"] = await run_in_threadpool(_png_uri, inputs.mask)
        elif options.strength is None:
            high = options.input_fidelity == "high"
            fields["strength"] = HIGH_FIDELITY_STRENGTH if high else EDIT_STRENGTH
        if options.strength is not None:
            fields["strength"] = options.strength
        job = await _finished(services, fields, request)
        return await _reply(services, job, options, target)

    return router
