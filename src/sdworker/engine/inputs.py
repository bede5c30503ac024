"""A job's input images: fetched through the guard, checked and fitted to the plan."""

from __future__ import annotations

from functools import partial

from PIL import Image

from sdworker.families import Task
from sdworker.fetch import load_image, require_same_size
from sdworker.media import fit_to_size
from sdworker.planning import GenerationPlan, check_upscale_size
from sdworker.settings import Settings


def prepare_inputs(
    plan: GenerationPlan, settings: Settings, *, allow_paths: bool
) -> dict[str, Image.Image]:
    """A plan's input images, fetched and fitted: the init image (and mask), the
    IP-Adapter reference, or the image to upscale (its size checked against the cap)."""
    if plan.image is None:
        return {}
    fetch = partial(
        load_image,
        max_bytes=settings.fetch_max_bytes,
        timeout_s=settings.fetch_timeout_s,
        policy=settings.address_policy,
        allow_paths=allow_paths,
    )
    image = fetch(plan.image, field="image").convert("RGB")
    if plan.reference is not None:
        return {"ip_adapter_image": image}
    if plan.task is Task.UPSCALE:
        check_upscale_size(plan, *image.size, settings.upscale_max_pixels)
        return {"image": image}
    if plan.task is Task.TEXT2IMG:
        return {}
    inputs = {"image": fit_to_size(image, plan.width, plan.height, plan.resize_mode)}
    if plan.task is Task.INPAINT and plan.mask is not None:
        mask = fetch(plan.mask, field="mask")
        require_same_size(image, mask)
        inputs["mask_image"] = fit_to_size(
            mask.convert("L"), plan.width, plan.height, plan.resize_mode
        )
    return inputs
