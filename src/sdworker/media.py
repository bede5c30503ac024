"""Image encoding and fitting: PNGs carrying their generation parameters, input resizing."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from sdworker.engine.schedulers import find_scheduler
from sdworker.jobs import ResizeMode
from sdworker.planning import GenerationPlan

PARAMETERS_CHUNK = "parameters"  # the PNG text key AUTOMATIC1111 and its readers use


def a1111_parameters(prompt: str, negative_prompt: str | None, fields: Mapping[str, object]) -> str:
    """Generation parameters in AUTOMATIC1111's text format, readable by its PNG Info tab."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def generation_parameters(
    plan: GenerationPlan, seed: int, model: str, size: tuple[int, int] | None = None
) -> str:
    """The parameters chunk of one image of a plan (`size`: the image's, when it is not
    the plan's, as for upscaling)."""
    width, height = size or (plan.width, plan.height)
    fields = {
        "Steps": plan.num_inference_steps,
        "Sampler": find_scheduler(plan.scheduler).label,
        "CFG scale": plan.guidance_scale,
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
        "Denoising strength": plan.strength,
        "Refiner": plan.refiner.mode.value if plan.refiner else None,
        "Lora": ", ".join(f"{lora.name}:{lora.weight:g}" for lora in plan.loras) or None,
        "Upscaler": f"{plan.upscale.upscaler} x{plan.upscale.factor}" if plan.upscale else None,
    }
    return a1111_parameters(plan.prompt, plan.negative_prompt, fields)


def encode_png(image: Image.Image, parameters: str | None = None) -> bytes:
    """PNG bytes with an optional `parameters` text chunk; deterministic for equal input."""
    info = PngInfo()
    if parameters:
        info.add_text(PARAMETERS_CHUNK, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def fit_to_size(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """Resize an input to the generation size under the job's resize policy."""
    if image.size == (width, height):
        return image
    resample = Image.Resampling.LANCZOS
    if mode is ResizeMode.CROP:
        return ImageOps.fit(image, (width, height), method=resample, centering=(0.5, 0.5))
    if mode is ResizeMode.PAD:
        return ImageOps.pad(image, (width, height), method=resample, color=0)
    return image.resize((width, height), resample=resample)


THUMBNAIL_EDGE = 256
THUMBNAIL_QUALITY = 85
_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def thumbnail_webp(image: Image.Image, edge: int = THUMBNAIL_EDGE) -> bytes:
    """WEBP thumbnail, longest edge `edge` px (never upscaled), aspect kept, quality 85."""
    thumb = image.convert("RGB")
    thumb.thumbnail((edge, edge), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    return buffer.getvalue()


def encode_image(
    image: Image.Image, fmt: str, parameters: str | None = None, quality: int = 95
) -> bytes:
    """Encode an output image as png, jpeg or webp (at `quality`) with its generation
    parameters (PNG text chunk; EXIF UserComment for JPEG/WEBP, where AUTOMATIC1111
    puts them)."""
    if fmt == "png":
        return encode_png(image, parameters)
    exif = Image.Exif()
    if parameters:
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
    buffer = io.BytesIO()
    pil_format = "JPEG" if fmt == "jpeg" else "WEBP"
    image.convert("RGB").save(buffer, format=pil_format, quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def data_uri(content_type: str, data: bytes) -> str:
    """`data:<type>;base64,<bytes>`: media inline in a JSON answer."""
    return f"data:{content_type};base64,{base64.b64encode(data).decode()}"
