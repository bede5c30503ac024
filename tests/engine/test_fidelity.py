"""The engine's pixels equal plain diffusers' for the same inputs and generators."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sdworker.engine.engine import EngineResult
from sdworker.engine.schedulers import scheduler_names
from sdworker.families import SDXL
from sdworker.jobs import JobSpec
from sdworker.media import encode_png
from tests.conftest import gradient_image, half_mask, max_pixel_difference

SIZE = 64
STEPS = 3

# What each scheduler name means in diffusers terms: the specification the engine's
# table must meet, written out independently of it.
REFERENCE_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde": ("DPMSolverSDEScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "flow_match_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
# The samplers an SDXL (epsilon UNet) model takes: all but the flow-matching ones.
UNET_SCHEDULERS = [name for name in scheduler_names() if SDXL.allows_scheduler(name)]


def test_reference_covers_every_scheduler() -> None:
    assert sorted(REFERENCE_SCHEDULERS) == sorted(scheduler_names())


@pytest.fixture(scope="module")
def reference(tiny_folder: Path) -> dict[str, Any]:
    import diffusers

    pipelines = {
        "text2img": diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_folder),
        "img2img": diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_folder),
        "inpaint": diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(tiny_folder),
    }
    for pipe in pipelines.values():
        pipe.set_progress_bar_config(disable=True)
    return pipelines


def _reference_images(pipe: Any, scheduler: str, seeds: list[int], **kwargs: Any) -> list[Any]:
    import diffusers

    class_name, overrides = REFERENCE_SCHEDULERS[scheduler]
    if class_name == "DPMSolverSDEScheduler":
        overrides = {"noise_sampler_seed": seeds}
    original = pipe.scheduler
    pipe.scheduler = getattr(diffusers, class_name).from_config(original.config, **overrides)
    try:
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        return list(pipe(generator=generators, num_images_per_prompt=len(seeds), **kwargs).images)
    finally:
        pipe.scheduler = original


def _assert_same(ours: EngineResult, theirs: list[Any]) -> None:
    assert len(ours.images) == len(theirs)
    for mine, expected in zip(ours.images, theirs, strict=True):
        assert mine.size == expected.size
        assert max_pixel_difference(mine, expected) <= 1


@pytest.mark.parametrize("scheduler", UNET_SCHEDULERS)
def test_text2img_matches_diffusers_for_every_scheduler(
    engine: Any, reference: dict[str, Any], scheduler: str
) -> None:
    spec = JobSpec(
        prompt="a red fox in snow",
        negative_prompt="blurry",
        size=f"{SIZE}x{SIZE}",
        steps=STEPS,
        guidance_scale=6.0,
        seed=1234,
        num_images=2,
        scheduler=scheduler,
    )
    ours = engine.run(spec)
    theirs = _reference_images(
        reference["text2img"],
        scheduler,
        [1234, 1235],
        prompt="a red fox in snow",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
    )
    _assert_same(ours, theirs)


def test_img2img_matches_diffusers(engine: Any, reference: dict[str, Any], tmp_path: Path) -> None:
    init = gradient_image(SIZE, SIZE)
    init.save(tmp_path / "init.png")
    spec = JobSpec(
        prompt="oil painting",
        image=str(tmp_path / "init.png"),
        strength=0.6,
        size=f"{SIZE}x{SIZE}",
        steps=5,
        guidance_scale=5.0,
        seed=7,
        num_images=2,
    )
    ours = engine.run(spec)
    theirs = _reference_images(
        reference["img2img"],
        "euler",
        [7, 8],
        prompt="oil painting",
        image=init,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
    )
    _assert_same(ours, theirs)


def test_inpaint_matches_diffusers(engine: Any, reference: dict[str, Any], tmp_path: Path) -> None:
    init, mask = gradient_image(SIZE, SIZE), half_mask(SIZE, SIZE)
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    spec = JobSpec(
        prompt="a cat",
        image=str(tmp_path / "init.png"),
        mask=str(tmp_path / "mask.png"),
        size=f"{SIZE}x{SIZE}",
        steps=4,
        guidance_scale=7.0,
        seed=99,
        scheduler="dpmpp_2m",
    )
    ours = engine.run(spec)
    theirs = _reference_images(
        reference["inpaint"],
        "dpmpp_2m",
        [99],
        prompt="a cat",
        image=init,
        mask_image=mask,
        width=SIZE,
        height=SIZE,
        strength=1.0,
        num_inference_steps=4,
        guidance_scale=7.0,
    )
    _assert_same(ours, theirs)


def test_same_spec_gives_same_png_bytes(engine: Any) -> None:
    spec = JobSpec(prompt="lighthouse", size="64x64", steps=2, seed=5, scheduler="euler_a")
    first, second = engine.run(spec), engine.run(spec)
    assert encode_png(first.images[0]) == encode_png(second.images[0])


@pytest.mark.parametrize("scheduler", UNET_SCHEDULERS)
def test_batch_image_i_equals_single_image_with_seed_plus_i(engine: Any, scheduler: str) -> None:
    common = {"prompt": "a boat", "size": "64x64", "steps": STEPS, "scheduler": scheduler}
    batch = engine.run(JobSpec(seed=500, num_images=3, **common))
    assert batch.seeds == [500, 501, 502]
    for index in (1, 2):
        alone = engine.run(JobSpec(seed=500 + index, num_images=1, **common))
        assert max_pixel_difference(batch.images[index], alone.images[0]) <= 1


def test_different_seeds_give_different_images(engine: Any) -> None:
    batch = engine.run(JobSpec(prompt="x", size="64x64", steps=2, seed=1, num_images=2))
    assert max_pixel_difference(batch.images[0], batch.images[1]) > 1
