"""Image encoding and fitting: PNGs carrying their generation parameters, input resizing."""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

from sdworker.jobs import ResizeMode

PARAMETERS_CHUNK = "parameters"  # the PNG text key AUTOMATIC1111 and its readers use


def a1111_parameters(prompt: str, negative_prompt: str | None, fields: Mapping[str, object]) -> str:
    """Generation parameters in AUTOMATIC1111's text format, readable by its PNG Info tab."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


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
