"""Resolving a JobSpec against a model family into a concrete generation plan."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from sdworker.errors import InvalidJobError
from sdworker.families import FamilyProfile, Task
from sdworker.jobs import PRESET_STEPS, SEED_MAX, JobSpec, ResizeMode

# Exact-copy mode of the replaced worker: a near-identity img2img pass.
EXACT_COPY_MAX_STRENGTH = 0.05
EXACT_COPY_MIN_STRENGTH = 0.01
EXACT_COPY_STEPS = (6, 10)
DEFAULT_IMG2IMG_STRENGTH = 0.75
DEFAULT_INPAINT_STRENGTH = 1.0


class GenerationMode(StrEnum):
    TEXT2IMG = "text2img"
    REFERENCE_MODIFY = "reference_modify"
    EXACT_COPY = "exact_copy"
    INPAINT = "inpaint"


@dataclass(frozen=True)
class GenerationPlan:
    """A JobSpec resolved against a model family: every value concrete, ready to run."""

    task: Task
    mode: GenerationMode
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_images: int
    seeds: list[int]
    num_inference_steps: int  # handed to diffusers (img2img runs int(n * strength) of them)
    denoise_steps: int  # steps that actually run
    guidance_scale: float
    scheduler: str
    strength: float | None
    image: str | None
    mask: str | None
    resize_mode: ResizeMode
    return_latents: bool
    warnings: list[str] = field(default_factory=list)


def _invalid(field_name: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field_name}: {message}", field=field_name)


def _resolve_task(spec: JobSpec, family: FamilyProfile) -> Task:
    task = spec.task
    if task is None:
        task = Task.INPAINT if spec.mask else Task.IMG2IMG if spec.image else Task.TEXT2IMG
    if task not in family.tasks:
        allowed = ", ".join(sorted(t.value for t in family.tasks))
        raise _invalid(
            "task", f"{task.value} is not supported by {family.name}; allowed: {allowed}"
        )
    if task in (Task.IMG2IMG, Task.INPAINT) and not spec.image:
        raise _invalid("image", f"{task.value} needs an input image")
    if task is Task.INPAINT and not spec.mask:
        raise _invalid("mask", "inpaint needs a mask image (white = repaint)")
    if task is Task.TEXT2IMG and (spec.image or spec.mask):
        raise _invalid("task", "text2img takes no image or mask; use img2img or inpaint")
    if spec.exact_copy_mode and task is not Task.IMG2IMG:
        raise _invalid("exact_copy_mode", "applies to img2img only")
    return task


def _resolve_size(spec: JobSpec, family: FamilyProfile) -> tuple[int, int]:
    width = spec.width if spec.width is not None else family.default_size[0]
    height = spec.height if spec.height is not None else family.default_size[1]
    for name, value in (("width", width), ("height", height)):
        if value % 8 or not family.min_side <= value <= family.max_side:
            raise _invalid(
                name,
                f"{value} is not allowed for {family.name}: use a multiple of 8 from "
                f"{family.min_side} to {family.max_side}",
            )
    return width, height


def _exact_copy_steps(strength: float) -> tuple[int, int]:
    """(denoise steps 6..10 growing with strength, scheduler steps that yield exactly them)."""
    low, high = EXACT_COPY_STEPS
    span = EXACT_COPY_MAX_STRENGTH - EXACT_COPY_MIN_STRENGTH
    denoise = low + round((high - low) * (strength - EXACT_COPY_MIN_STRENGTH) / span)
    total = math.ceil(denoise / strength)
    while int(total * strength) < denoise:  # diffusers runs int(n * strength) steps
        total += 1
    return denoise, total


def plan_generation(spec: JobSpec, family: FamilyProfile, *, max_num_images: int) -> GenerationPlan:
    """Resolve defaults, img2img modes and family bounds; raise InvalidJobError on misuse."""
    task = _resolve_task(spec, family)
    width, height = _resolve_size(spec, family)
    if spec.num_images > max_num_images:
        raise _invalid("num_images", f"{spec.num_images} is over the limit of {max_num_images}")
    seed = spec.seed if spec.seed is not None else secrets.randbelow(SEED_MAX + 1)
    # Image i uses seed + i (wrapped so every returned seed is a valid input seed).
    seeds = [(seed + i) % (SEED_MAX + 1) for i in range(spec.num_images)]
    warnings: list[str] = []
    preset_steps = PRESET_STEPS.get(spec.preset) if spec.preset else None
    steps = spec.steps or preset_steps or family.default_steps
    guidance = spec.guidance_scale if spec.guidance_scale is not None else family.default_guidance
    negative = spec.negative_prompt
    strength: float | None = None
    mode = GenerationMode.TEXT2IMG if task is Task.TEXT2IMG else GenerationMode.INPAINT

    if task is not Task.TEXT2IMG:
        strength = spec.strength
        if strength is None and spec.reference_strength is not None:
            strength = 1.0 - spec.reference_strength
        elif strength is not None and spec.reference_strength is not None:
            warnings.append("both strength and reference_strength given; strength was used")
        if strength is None:
            strength = (
                DEFAULT_INPAINT_STRENGTH if task is Task.INPAINT else DEFAULT_IMG2IMG_STRENGTH
            )

    denoise_steps = steps
    if spec.exact_copy_mode:
        mode = GenerationMode.EXACT_COPY
        assert strength is not None
        strength = min(max(strength, EXACT_COPY_MIN_STRENGTH), EXACT_COPY_MAX_STRENGTH)
        denoise_steps, steps = _exact_copy_steps(strength)
        guidance = 1.0
        if negative:
            warnings.append("exact_copy_mode ignores negative_prompt")
        negative = None
    elif task is Task.IMG2IMG:
        mode = GenerationMode.REFERENCE_MODIFY
    if strength is not None and not spec.exact_copy_mode:
        denoise_steps = min(int(steps * strength), steps)
        if denoise_steps < 1:
            raise _invalid(
                "strength",
                f"steps={steps} x strength={strength:g} runs no denoising step; raise steps "
                f"to at least {math.ceil(1 / strength) if strength else 'any'} or strength",
            )

    return GenerationPlan(
        task=task,
        mode=mode,
        prompt=spec.prompt,
        negative_prompt=negative or None,
        width=width,
        height=height,
        num_images=spec.num_images,
        seeds=seeds,
        num_inference_steps=steps,
        denoise_steps=denoise_steps,
        guidance_scale=guidance,
        scheduler=spec.scheduler or family.default_scheduler,
        strength=strength,
        image=spec.image,
        mask=spec.mask,
        resize_mode=spec.resize_mode,
        return_latents=spec.return_latents,
        warnings=warnings,
    )
