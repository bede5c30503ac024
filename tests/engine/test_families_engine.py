"""Every family and task through the engine equals plain diffusers on the tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdworker.engine.engine import Engine, EngineResult
from sdworker.engine.models import PIPELINE_CLASSES, pipeline_options
from sdworker.engine.tiny import ensure_tiny_model
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask, max_pixel_difference

SIZE = 64
IMAGE_FAMILIES = {"tiny-sd15": "sd15", "tiny-sd21": "sd21", "tiny-sd3": "sd3"}


def _reference(name: str, slot: int, cache_dir: Path, settings: Settings) -> Any:
    import diffusers

    family = IMAGE_FAMILIES.get(name, "wan-t2v")
    cls = getattr(diffusers, PIPELINE_CLASSES[family][slot])
    pipe = cls.from_pretrained(
        ensure_tiny_model(name, cache_dir), **pipeline_options(settings, family)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _assert_same(ours: EngineResult, theirs: list[Image.Image]) -> None:
    assert len(ours.images) == len(theirs)
    for mine, expected in zip(ours.images, theirs, strict=True):
        assert mine.size == expected.size
        assert max_pixel_difference(mine, expected) <= 1


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("inputs")
    gradient_image(SIZE, SIZE).save(folder / "init.png")
    half_mask(SIZE, SIZE).save(folder / "mask.png")
    return {"image": str(folder / "init.png"), "mask": str(folder / "mask.png")}


@pytest.mark.parametrize("name", list(IMAGE_FAMILIES))
def test_text2img_matches_diffusers(
    engine: Engine, settings: Settings, cache_dir: Path, name: str
) -> None:
    ours = engine.run(
        JobSpec(model=name, prompt="a red fox", negative_prompt="blurry", size="64x64",
                steps=3, guidance_scale=6.0, seed=11, num_images=2)
    )  # fmt: skip
    assert isinstance(ours, EngineResult) and ours.family == IMAGE_FAMILIES[name]
    pipe = _reference(name, 0, cache_dir, settings)
    theirs = pipe(
        prompt="a red fox", negative_prompt="blurry", width=SIZE, height=SIZE,
        num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=2,
        generator=_generators([11, 12]),
    ).images  # fmt: skip
    _assert_same(ours, theirs)


@pytest.mark.parametrize("name", list(IMAGE_FAMILIES))
def test_img2img_matches_diffusers(
    engine: Engine, settings: Settings, cache_dir: Path, files: dict[str, str], name: str
) -> None:
    ours = engine.run(
        JobSpec(model=name, prompt="oil painting", image=files["image"], strength=0.6,
                size="64x64", steps=5, guidance_scale=5.0, seed=7)
    )  # fmt: skip
    assert isinstance(ours, EngineResult)
    pipe = _reference(name, 1, cache_dir, settings)
    theirs = pipe(
        prompt="oil painting", image=gradient_image(SIZE, SIZE), strength=0.6,
        num_inference_steps=5, guidance_scale=5.0, generator=_generators([7]),
    ).images  # fmt: skip
    _assert_same(ours, theirs)


@pytest.mark.parametrize("name", list(IMAGE_FAMILIES))
def test_inpaint_matches_diffusers(
    engine: Engine, settings: Settings, cache_dir: Path, files: dict[str, str], name: str
) -> None:
    ours = engine.run(
        JobSpec(model=name, prompt="a cat", image=files["image"], mask=files["mask"],
                size="64x64", steps=4, guidance_scale=7.0, seed=99)
    )  # fmt: skip
    assert isinstance(ours, EngineResult)
    pipe = _reference(name, 2, cache_dir, settings)
    theirs = pipe(
        prompt="a cat", image=gradient_image(SIZE, SIZE), mask_image=half_mask(SIZE, SIZE),
        width=SIZE, height=SIZE, strength=1.0, num_inference_steps=4, guidance_scale=7.0,
        generator=_generators([99]),
    ).images  # fmt: skip
    _assert_same(ours, theirs)


def test_text2video_matches_diffusers(engine: Engine, settings: Settings, cache_dir: Path) -> None:
    steps: list[tuple[int, int]] = []
    ours = engine.run(
        JobSpec(model="tiny-wan", prompt="a cat walking", negative_prompt="blurry",
                width=64, height=64, num_frames=16, fps=8, steps=2, seed=5),
        on_step=lambda step, total: steps.append((step, total)),
    )  # fmt: skip
    assert isinstance(ours, EngineResult) and ours.videos is not None
    assert steps == [(1, 2), (2, 2)]  # progress per step
    pipe = _reference("tiny-wan", 0, cache_dir, settings)
    theirs = pipe(
        prompt="a cat walking", negative_prompt="blurry", width=64, height=64, num_frames=17,
        num_inference_steps=2, guidance_scale=5.0, generator=_generators([5]),
        output_type="pil",
    ).frames[0]  # fmt: skip
    video = ours.videos[0]
    assert len(video) == 16  # asked for 16: Wan made 17 (4k + 1), the last is dropped
    for mine, expected in zip(video, theirs[:16], strict=True):
        assert mine.size == (64, 64) and max_pixel_difference(mine, expected) <= 1
    assert ours.images[0] is video[0]  # the poster frame


def test_v_prediction_is_kept_and_can_be_overridden(
    settings: Settings, cache_dir: Path, tmp_path: Path
) -> None:
    registry = (
        '{"sd2-v": {"source": "tiny-sd21"}, '
        '"sd2-eps": {"source": "tiny-sd21", "prediction_type": "epsilon"}}'
    )
    engine = Engine(settings.model_copy(update={"models": registry}))
    spec = {"prompt": "x", "size": "64x64", "steps": 2, "seed": 3}
    v_model = engine.load("sd2-v").pipelines.base
    assert v_model.scheduler.config.prediction_type == "v_prediction"
    eps_model = engine.load("sd2-eps").pipelines.base
    assert eps_model.scheduler.config.prediction_type == "epsilon"
    v_image = engine.run(JobSpec(model="sd2-v", **spec))
    eps_image = engine.run(JobSpec(model="sd2-eps", **spec))
    assert isinstance(v_image, EngineResult) and isinstance(eps_image, EngineResult)
    assert max_pixel_difference(v_image.images[0], eps_image.images[0]) > 1


def test_safety_checker_is_off_by_default_and_a_setting(settings: Settings) -> None:
    from sdworker.engine.tiny_families import TINY_SAFETY_CHECKER_FLAGS_ALL

    spec = JobSpec(model="tiny-sd15", prompt="x", size="64x64", steps=2, seed=1)
    plain = Engine(settings).run(spec)
    assert isinstance(plain, EngineResult) and not plain.warnings
    assert Engine(settings).load("tiny-sd15").pipelines.base.safety_checker is None
    checked = Engine(settings.model_copy(update={"safety_checker": True}))
    assert checked.load("tiny-sd15").pipelines.base.safety_checker is not None
    result = checked.run(spec)
    assert isinstance(result, EngineResult)
    if TINY_SAFETY_CHECKER_FLAGS_ALL:  # the tiny checker flags every image, by design
        assert np.asarray(result.images[0]).max() == 0
        assert "flagged by the safety checker" in result.warnings[0]


def test_the_safety_checker_setting_on_a_model_without_one_is_a_load_error(
    settings: Settings,
) -> None:
    from sdworker.errors import ModelLoadError

    engine = Engine(settings.model_copy(update={"safety_checker": True}))
    with pytest.raises(ModelLoadError, match="ships no safety_checker"):
        engine.load("tiny-sd21")
