"""Checks a submitted job before it is enqueued: family bounds and input images.

Input images are read here (base64 decoded, URLs fetched through the SSRF guard), so a
malformed, unreachable or refused one is a 422 naming the field instead of a failed job
later; the worker reads them again when it runs the job. Paths on the server's disk are
refused: the API must not read its own files for callers.
"""

from __future__ import annotations

from PIL import Image

from sdworker.api.services import Services
from sdworker.errors import InvalidJobError
from sdworker.fetch import load_image, require_same_size
from sdworker.jobs import JobSpec
from sdworker.model_registry import default_model_for
from sdworker.netguard import UnsafeUrlError
from sdworker.planning import GenerationPlan, check_upscale_size, plan_generation
from sdworker.settings import Settings


def _check_image(ref: str, field: str, settings: Settings) -> Image.Image:
    """Fetch (URLs, through the address guard) or decode (base64) an input now, so that
    a refused, unreachable or non-image input is a 422 naming the field."""
    return load_image(
        ref,
        field=field,
        max_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        policy=settings.address_policy,
        allow_paths=False,
    )


def validate_job(spec: JobSpec, services: Services) -> GenerationPlan:
    """Raise a 4xx-mapped error for anything the worker would refuse; return the plan."""
    settings = services.settings
    model = default_model_for(spec, settings)
    features = services.features_of(model)
    plan = plan_generation(
        spec,
        services.family_of(model),
        max_num_images=settings.max_num_images,
        features=features,
    )
    image = _check_image(spec.image, "image", settings) if spec.image else None
    if plan.upscale is not None and image is not None:
        check_upscale_size(plan, image.width, image.height, features.upscale_max_pixels)
    mask = _check_image(spec.mask, "mask", settings) if spec.mask else None
    if image is not None and mask is not None:
        require_same_size(image, mask)
    if spec.webhook:
        try:
            settings.address_policy.resolve(spec.webhook)
        except UnsafeUrlError as exc:
            raise InvalidJobError(
                f"webhook: refused {spec.webhook}: {exc}", field="webhook"
            ) from None
    return plan
