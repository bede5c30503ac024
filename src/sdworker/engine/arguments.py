"""Diffusers call arguments for a plan, or for several compatible plans in one batch."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from sdworker.errors import InvalidJobError
from sdworker.families import Task
from sdworker.planning import GenerationPlan

# Plan fields every job of a batch must share: they shape the one denoising loop.
_SHARED_PLAN_FIELDS = (
    "task",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "strength",
    "loras",
    "refiner",
    "reference",
    "upscale",
    "prompt_weighting",
)


def check_batchable(plans: list[GenerationPlan]) -> None:
    """Raise InvalidJobError unless the plans can run in one pipeline call."""
    first = plans[0]
    if len(plans) > 1 and any(p.task is Task.INPAINT and p.num_images > 1 for p in plans):
        # see jobs.batch_key_of: diffusers encodes such a job's image with one generator
        raise InvalidJobError("inpainting jobs of several images run alone", field="num_images")
    if len(plans) > 1 and any(p.reference or p.upscale for p in plans):
        raise InvalidJobError("reference-image and upscale jobs run alone", field="task")
    for plan in plans[1:]:
        for name in _SHARED_PLAN_FIELDS:
            if getattr(plan, name) != getattr(first, name):
                raise InvalidJobError(
                    f"jobs of one batch differ in {name}: {getattr(first, name)!r} vs "
                    f"{getattr(plan, name)!r}",
                    field=name,
                )
        if (plan.negative_prompt is None) != (first.negative_prompt is None):
            raise InvalidJobError(
                "jobs of one batch must all have a negative prompt or all have none",
                field="negative_prompt",
            )


def batch_arguments(
    plans: list[GenerationPlan], inputs: list[dict[str, Image.Image]]
) -> dict[str, Any]:
    """One diffusers call for several jobs: a prompt (and input image) per image, and
    one generator per image seeded as the job alone would seed it."""
    first = plans[0]
    arguments = pipeline_arguments(first)
    per_image: dict[str, list[Any]] = {"prompt": [], "negative_prompt": []}
    for plan, images in zip(plans, inputs, strict=True):
        for _ in range(plan.num_images):
            per_image["prompt"].append(plan.prompt)
            per_image["negative_prompt"].append(plan.negative_prompt)
            for name, image in images.items():
                per_image.setdefault(name, []).append(image)
    arguments |= per_image
    if first.negative_prompt is None:
        arguments["negative_prompt"] = None  # zero embeddings for all (SDXL's default)
    arguments["num_images_per_prompt"] = 1
    arguments["generator"] = [
        torch.Generator("cpu").manual_seed(seed) for plan in plans for seed in plan.seeds
    ]
    return arguments


def pipeline_arguments(plan: GenerationPlan) -> dict[str, Any]:
    """The diffusers call arguments of a plan (inputs images aside), with CPU generators
    so that a seed gives the same initial noise on every device."""
    arguments: dict[str, Any] = {
        "prompt": plan.prompt,
        "negative_prompt": plan.negative_prompt,
        "num_inference_steps": plan.num_inference_steps,
        "guidance_scale": plan.guidance_scale,
        "num_images_per_prompt": plan.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds],
    }
    if plan.task is not Task.IMG2IMG:  # img2img takes its size from the image
        arguments |= {"width": plan.width, "height": plan.height}
    if plan.video is not None:
        arguments["num_frames"] = plan.video.generated_frames
        arguments["num_videos_per_prompt"] = arguments.pop("num_images_per_prompt")
    if plan.strength is not None:
        arguments["strength"] = plan.strength
    return arguments
