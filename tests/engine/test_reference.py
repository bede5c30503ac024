"""Reference images through an IP-Adapter (tiny random weights and CLIP vision encoder):
style and character steer text2img, scale 0 changes nothing, the adapter is unloaded
for jobs without a reference, pixels equal plain diffusers'; composition is img2img."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from sdworker.engine.engine import Engine, EngineResult
from sdworker.engine.reference import ip_adapter_scale, split_weights_location
from sdworker.errors import InvalidJobError, ModelLoadError
from sdworker.families import Task
from sdworker.jobs import JobSpec
from sdworker.options import ReferenceType
from sdworker.settings import Settings
from tests.conftest import gradient_image, max_pixel_difference
from tests.support.adapter_builders import build_tiny_ip_adapter

SUBFOLDER = "sdxl_models"
WEIGHTS = "ip-adapter.safetensors"
# The engine gives the encoder CLIP's usual 224 px preprocessing (see the xfail below).
ENCODER_SIZE = 224
SCALE = 0.8
JOB: dict[str, Any] = {
    "prompt": "a portrait",
    "negative_prompt": "blurry",
    "size": "64x64",
    "steps": 3,
    "guidance_scale": 5.0,
    "seed": 21,
}


def reference_picture() -> Image.Image:
    return gradient_image(64, 64).transpose(Image.Transpose.ROTATE_90)


def run(engine: Engine, spec: JobSpec) -> EngineResult:
    result = engine.run(spec)
    assert isinstance(result, EngineResult)
    return result


@pytest.fixture(scope="module")
def base_pipe(tiny_folder: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_adapter(base_pipe: Any, folder: Path, image_size: int) -> Path:
    build_tiny_ip_adapter(base_pipe, folder, subfolder=SUBFOLDER, image_size=image_size)
    return folder


@pytest.fixture(scope="module")
def adapter_folder(base_pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_adapter(base_pipe, tmp_path_factory.mktemp("ip-adapter"), ENCODER_SIZE)


def ip_settings(settings: Settings, folder: Path, weights: str = WEIGHTS) -> Settings:
    return settings.model_copy(
        update={
            "ip_adapter": str(folder / SUBFOLDER / weights),
            "ip_adapter_image_encoder": str(folder / SUBFOLDER / "image_encoder"),
        }
    )


@pytest.fixture(scope="module")
def ip_engine(settings: Settings, adapter_folder: Path) -> Engine:
    return Engine(ip_settings(settings, adapter_folder))


@pytest.fixture(scope="module")
def reference_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("reference") / "reference.png"
    reference_picture().save(path)
    return str(path)


@pytest.fixture(scope="module")
def runs(ip_engine: Engine, reference_path: str) -> dict[str, EngineResult]:
    """One engine, in this order: a plain job, reference jobs, then a plain job again."""
    reference = {"image": reference_path}
    return {
        "plain": run(ip_engine, JobSpec(**JOB)),
        "character": run(
            ip_engine,
            JobSpec(**JOB, **reference, reference_type="character", reference_scale=SCALE),
        ),
        "style": run(
            ip_engine, JobSpec(**JOB, **reference, reference_type="style", reference_scale=SCALE)
        ),
        "zero": run(
            ip_engine, JobSpec(**JOB, **reference, reference_type="character", reference_scale=0)
        ),
        "after": run(ip_engine, JobSpec(**JOB)),
    }


def test_style_and_character_steer_text2img(runs: dict[str, EngineResult]) -> None:
    plain = runs["plain"].images[0]
    for kind in ("character", "style"):
        result = runs[kind]
        assert result.plan.task is Task.TEXT2IMG
        assert result.plan.reference is not None
        assert result.plan.reference.type is ReferenceType(kind)
        assert result.images[0].size == (64, 64)
        assert max_pixel_difference(result.images[0], plain) > 8
    assert max_pixel_difference(runs["character"].images[0], runs["style"].images[0]) > 8


def test_character_at_scale_zero_equals_the_plain_image(runs: dict[str, EngineResult]) -> None:
    assert max_pixel_difference(runs["zero"].images[0], runs["plain"].images[0]) <= 1


def test_a_job_without_reference_after_one_equals_a_plain_run(
    runs: dict[str, EngineResult], ip_engine: Engine
) -> None:
    for after, before in zip(runs["after"].images, runs["plain"].images, strict=True):
        assert max_pixel_difference(after, before) == 0
    base = ip_engine.load().pipelines.base
    assert base.image_encoder is None and base.feature_extractor is None
    assert base.unet.encoder_hid_proj is None  # the adapter was unloaded


@pytest.fixture(scope="module")
def diffusers_ip(base_pipe: Any, adapter_folder: Path) -> Any:
    """Plain diffusers with the same adapter, loaded its documented way."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pipe(base_pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(
        str(adapter_folder),
        subfolder=SUBFOLDER,
        weight_name=WEIGHTS,
        image_encoder_folder="image_encoder",
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    yield pipe
    pipe.unload_ip_adapter()  # the UNet is base_pipe's


def diffusers_images(pipe: Any, scale: Any, num_images: int) -> list[Image.Image]:
    pipe.set_ip_adapter_scale(scale)
    return list(
        pipe(
            prompt=JOB["prompt"],
            negative_prompt=JOB["negative_prompt"],
            width=64,
            height=64,
            num_inference_steps=JOB["steps"],
            guidance_scale=JOB["guidance_scale"],
            ip_adapter_image=reference_picture(),
            num_images_per_prompt=num_images,
            generator=[torch.Generator("cpu").manual_seed(21 + i) for i in range(num_images)],
        ).images
    )


def test_character_matches_diffusers(
    ip_engine: Engine, reference_path: str, diffusers_ip: Any
) -> None:
    ours = run(
        ip_engine,
        JobSpec(
            **JOB,
            image=reference_path,
            reference_type="character",
            reference_scale=SCALE,
            num_images=2,
        ),
    )
    theirs = diffusers_images(diffusers_ip, SCALE, 2)
    for mine, expected in zip(ours.images, theirs, strict=True):
        assert max_pixel_difference(mine, expected) <= 1


def test_style_matches_diffusers_instantstyle(
    runs: dict[str, EngineResult], diffusers_ip: Any
) -> None:
    # InstantStyle: only the second attention of the first up block sees the image.
    theirs = diffusers_images(diffusers_ip, {"up": {"block_0": [0.0, SCALE]}}, 1)
    assert max_pixel_difference(runs["style"].images[0], theirs[0]) <= 1


def test_default_scale_is_the_setting(
    ip_engine: Engine, reference_path: str, settings: Settings, runs: dict[str, EngineResult]
) -> None:
    spec = {**JOB, "image": reference_path, "reference_type": "character"}
    default = run(ip_engine, JobSpec(**spec))
    assert settings.ip_adapter_scale == 0.6
    explicit = run(ip_engine, JobSpec(**spec, reference_scale=0.6))
    assert max_pixel_difference(default.images[0], explicit.images[0]) == 0
    # and not the scale of an earlier job (SCALE): the scale is set for every job
    assert max_pixel_difference(default.images[0], runs["character"].images[0]) > 0


def test_scale_per_reference_type(base_pipe: Any) -> None:
    unet = base_pipe.unet
    assert len(unet.up_blocks[0].attentions) == 2
    assert ip_adapter_scale(unet, ReferenceType.CHARACTER, 0.7) == 0.7
    assert ip_adapter_scale(unet, ReferenceType.STYLE, 0.7) == {"up": {"block_0": [0.0, 0.7]}}


def test_weights_locations(tmp_path: Path) -> None:
    weight = tmp_path / "ip.safetensors"
    weight.write_bytes(b"")
    assert split_weights_location(str(weight)) == (str(tmp_path), "", "ip.safetensors")
    assert split_weights_location("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors") == (
        "h94/IP-Adapter",
        "sdxl_models",
        "ip-adapter_sdxl.safetensors",
    )
    assert split_weights_location("org/repo/w.bin") == ("org/repo", "", "w.bin")
    with pytest.raises(ModelLoadError) as info:
        split_weights_location("org/weights.bin")
    assert info.value.field == "reference_type"


@pytest.mark.parametrize("kind", ["style", "character"])
@pytest.mark.parametrize(
    "configured",
    [{}, {"ip_adapter": "x/y/ip.safetensors"}, {"ip_adapter_image_encoder": "encoder"}],
    ids=["none", "weights-only", "encoder-only"],
)
def test_without_ip_adapter_settings_the_error_names_the_field_and_setting(
    settings: Settings, kind: str, configured: dict[str, str]
) -> None:
    engine = Engine(settings.model_copy(update=configured))
    with pytest.raises(InvalidJobError) as info:
        engine.plan(JobSpec(**JOB, image="ref.png", reference_type=kind))
    assert info.value.field == "reference_type"
    assert "SDWORKER_IP_ADAPTER" in info.value.message


def test_style_reference_needs_an_image(ip_engine: Engine) -> None:
    with pytest.raises(InvalidJobError) as info:
        ip_engine.plan(JobSpec(**JOB, reference_type="style"))
    assert info.value.field == "image"


def test_composition_is_plain_img2img(ip_engine: Engine, reference_path: str) -> None:
    common = {**JOB, "image": reference_path, "strength": 0.7}
    composition = run(ip_engine, JobSpec(**common, reference_type="composition"))
    assert composition.plan.task is Task.IMG2IMG and composition.plan.reference is None
    img2img = run(ip_engine, JobSpec(**common))
    assert max_pixel_difference(composition.images[0], img2img.images[0]) == 0
    assert ip_engine.load().pipelines.base.image_encoder is None  # no adapter loaded


def test_an_encoder_of_another_image_size_works(
    settings: Settings,
    base_pipe: Any,
    reference_path: str,
    runs: dict[str, EngineResult],
    tmp_path: Path,
) -> None:
    folder = build_adapter(base_pipe, tmp_path / "ip-32", image_size=32)
    engine = Engine(ip_settings(settings, folder))
    result = run(
        engine,
        JobSpec(**JOB, image=reference_path, reference_type="character", reference_scale=SCALE),
    )
    assert max_pixel_difference(result.images[0], runs["plain"].images[0]) > 8
