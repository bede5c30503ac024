"""Checks a submitted job before it is enqueued: family bounds and inline images.

Images given inline (data URI or base64) are decoded here, so a malformed one is a 422
naming the field instead of a failed job later. URLs are fetched by the worker. Paths on
the server's disk are refused: the API must not read its own files for callers.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from PIL import Image

from sdworker.api.services import Services
from sdworker.errors import InputImageError
from sdworker.fetch import decode_image, require_same_size
from sdworker.jobs import JobSpec
from sdworker.planning import GenerationPlan, plan_generation


def _inline_image(ref: str, field: str, max_bytes: int) -> Image.Image | None:
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        return None
    payload = ref.partition(",")[2] if ref.startswith("data:") else ref
    try:
        data = b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputImageError(
            f"{field}: must be an http(s) URL, a data URI or base64 image data "
            "(paths on the server are not accepted)",
            field=field,
        ) from None
    if len(data) > max_bytes:
        raise InputImageError(f"{field}: image is larger than {max_bytes} bytes", field=field)
    return decode_image(data, field=field)


def validate_job(spec: JobSpec, services: Services) -> GenerationPlan:
    """Raise a 4xx-mapped error for anything the worker would refuse; return the plan."""
    settings = services.settings
    plan = plan_generation(
        spec, services.family_of(spec.model), max_num_images=settings.max_num_images
    )
    image = _inline_image(spec.image, "image", settings.fetch_max_bytes) if spec.image else None
    mask = _inline_image(spec.mask, "mask", settings.fetch_max_bytes) if spec.mask else None
    if image is not None and mask is not None:
        require_same_size(image, mask)
    return plan
