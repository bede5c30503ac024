"""The SDXL refiner (ensemble and refine modes) on the tiny models: pixels equal plain
diffusers', presets and errors, progress across base + refiner, shared components, the
settings alias, a single-file refiner; and the watermark pipeline option."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image

from sdworker.engine.engine import Engine, EngineResult
from sdworker.engine.ldm_layout import (
    OPEN_CLIP_PREFIX,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)
from sdworker.engine.models import SourceKind, pipeline_options, resolve_model
from sdworker.engine.tiny import ensure_tiny_model
from sdworker.errors import InvalidJobError, ModelLoadError
from sdworker.families import Task
from sdworker.jobs import JobSpec
from sdworker.loras import LoraLibrary
from sdworker.options import RefinerMode
from sdworker.planning import features_from_settings
from sdworker.settings import Settings
from tests.conftest import gradient_image, max_pixel_difference

REFINER = "tiny-sdxl-refiner"
PROMPT = "a red fox in snow"
NEGATIVE = "blurry"
SEED = 1234
# Ensemble: the base runs the noisy half of 4 steps, the refiner the rest of its 6.
ENSEMBLE = {"steps": 4, "high_noise_frac": 0.5, "refiner_inference_steps": 6}
# Refine: the base runs all 4 steps, the refiner int(4 * 0.5) = 2 img2img steps.
REFINE = {"steps": 4, "refiner_strength": 0.5, "refiner_inference_steps": 4}


def spec_of(**fields: Any) -> JobSpec:
    common: dict[str, Any] = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "size": "64x64",
        "guidance_scale": 5.0,
        "seed": SEED,
        "num_images": 2,
    }
    return JobSpec(**(common | fields))


def run(engine: Engine, spec: JobSpec, on_step: Any = None) -> EngineResult:
    result = engine.run(spec, on_step=on_step)
    assert isinstance(result, EngineResult)
    return result


def assert_same_images(ours: list[Image.Image], theirs: list[Image.Image]) -> None:
    assert len(ours) == len(theirs)
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.size == expected.size
        assert max_pixel_difference(mine, expected) <= 1


@pytest.fixture(scope="module")
def refiner_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"refiner": REFINER})


@pytest.fixture(scope="module")
def refiner_engine(refiner_settings: Settings, tiny_folder: Path) -> Engine:
    return Engine(refiner_settings)


@pytest.fixture(scope="module")
def diffusers_pair(tiny_folder: Path, cache_dir: Path) -> tuple[Any, Any]:
    """Plain diffusers: the base, and the refiner built as diffusers' docs build it,
    sharing the base's VAE and second text encoder. The engine replaces each pipeline's
    scheduler by a fresh one of the job's scheduler from the model's own config (euler
    by default), so the reference does the same."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    base = StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        ensure_tiny_model(REFINER, cache_dir),
        vae=base.vae,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
    )
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return base, refiner


def diffusers_images(pair: tuple[Any, Any], mode: str, **job: Any) -> list[Image.Image]:
    base, refiner = pair
    generators = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
    shared = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "guidance_scale": 5.0,
        "num_images_per_prompt": 2,
        "generator": generators,  # the SAME generators go on into the refiner call
    }
    base_call = shared | {"width": 64, "height": 64, "num_inference_steps": job["steps"]}
    if mode == "ensemble":
        latents = base(
            **base_call, denoising_end=job["high_noise_frac"], output_type="latent"
        ).images
        refined = refiner(
            **shared,
            image=latents,
            num_inference_steps=job["refiner_inference_steps"],
            denoising_start=job["high_noise_frac"],
        )
    else:
        latents = base(**base_call, output_type="latent").images
        refined = refiner(
            **shared,
            image=latents,
            num_inference_steps=job["refiner_inference_steps"],
            strength=job["refiner_strength"],
        )
    return list(refined.images)


@pytest.fixture(scope="module")
def ensemble_run(refiner_engine: Engine) -> tuple[EngineResult, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    result = run(
        refiner_engine, spec_of(refiner="ensemble", **ENSEMBLE), lambda s, t: seen.append((s, t))
    )
    return result, seen


@pytest.fixture(scope="module")
def refine_run(refiner_engine: Engine) -> tuple[EngineResult, list[tuple[int, int]]]:
    seen: list[tuple[int, int]] = []
    result = run(
        refiner_engine, spec_of(refiner="refine", **REFINE), lambda s, t: seen.append((s, t))
    )
    return result, seen


# -- fidelity ----------------------------------------------------------------------------


def test_ensemble_matches_diffusers(ensemble_run: Any, diffusers_pair: Any) -> None:
    result, _ = ensemble_run
    assert result.plan.refiner is not None
    assert result.plan.refiner.mode is RefinerMode.ENSEMBLE
    assert_same_images(result.images, diffusers_images(diffusers_pair, "ensemble", **ENSEMBLE))


def test_refine_mode_matches_diffusers(refine_run: Any, diffusers_pair: Any) -> None:
    result, _ = refine_run
    assert result.plan.refiner is not None
    assert result.plan.refiner.mode is RefinerMode.REFINE
    assert_same_images(result.images, diffusers_images(diffusers_pair, "refine", **REFINE))


def test_refined_images_differ_from_the_base_images(
    refiner_engine: Engine, ensemble_run: Any, refine_run: Any
) -> None:
    plain = run(refiner_engine, spec_of(steps=4))
    assert plain.plan.refiner is None
    for refined in (ensemble_run[0], refine_run[0]):
        for mine, base in zip(refined.images, plain.images, strict=True):
            assert max_pixel_difference(mine, base) > 8


def test_prompt_weighting_encodes_for_the_refiner_as_diffusers_does(
    refiner_engine: Engine, diffusers_pair: Any
) -> None:
    """With weighting on, both the base and the refiner get compel embeddings instead of
    the text: for a prompt without weights they equal diffusers' own encoding."""
    result = run(refiner_engine, spec_of(refiner="ensemble", prompt_weighting=True, **ENSEMBLE))
    assert_same_images(result.images, diffusers_images(diffusers_pair, "ensemble", **ENSEMBLE))


def test_high_quality_means_ensemble(refiner_engine: Engine, ensemble_run: Any) -> None:
    result = run(refiner_engine, spec_of(high_quality=True, **ENSEMBLE))
    assert result.plan.refiner is not None
    assert result.plan.refiner.mode is RefinerMode.ENSEMBLE
    assert_same_images(result.images, ensemble_run[0].images)


def test_high_quality_img2img_refines_the_base_image(refiner_engine: Engine) -> None:
    # The base's partial latents exist only for text2img: other tasks refine.
    plan = refiner_engine.plan(
        spec_of(high_quality=True, image="init.png", strength=0.5, steps=4, num_images=1)
    )
    assert plan.task is Task.IMG2IMG
    assert plan.refiner is not None and plan.refiner.mode is RefinerMode.REFINE


def test_refiner_field_wins_over_high_quality(refiner_engine: Engine) -> None:
    refine = refiner_engine.plan(spec_of(high_quality=True, refiner="refine"))
    assert refine.refiner is not None and refine.refiner.mode is RefinerMode.REFINE
    assert refiner_engine.plan(spec_of(high_quality=True, refiner="off")).refiner is None


def test_refiner_defaults(refiner_engine: Engine) -> None:
    plan = refiner_engine.plan(spec_of(refiner="ensemble", steps=7))
    assert plan.refiner is not None
    assert (plan.refiner.high_noise_frac, plan.refiner.steps) == (0.8, 7)
    plan = refiner_engine.plan(spec_of(refiner="refine", steps=7))
    assert plan.refiner is not None and plan.refiner.strength == 0.3


# -- presets and errors ------------------------------------------------------------------


def test_preset_high_without_a_refiner_is_25_steps_and_no_error(engine: Engine) -> None:
    plan = engine.plan(spec_of(preset="sdxl_image_high"))
    assert plan.num_inference_steps == 25
    assert plan.refiner is None


def test_preset_high_with_a_refiner_turns_it_on(refiner_engine: Engine, ensemble_run: Any) -> None:
    plan = refiner_engine.plan(spec_of(preset="sdxl_image_high"))
    assert plan.num_inference_steps == 25
    assert plan.refiner is not None
    assert (plan.refiner.mode, plan.refiner.steps) == (RefinerMode.ENSEMBLE, 25)
    # Fields a job sets win over the preset; the refiner stays on.
    result = run(refiner_engine, spec_of(preset="sdxl_image_high", **ENSEMBLE))
    assert_same_images(result.images, ensemble_run[0].images)
    off = refiner_engine.plan(spec_of(preset="sdxl_image_high", refiner="off"))
    assert off.refiner is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"refiner": "ensemble"}, "refiner"),
        ({"refiner": "refine"}, "refiner"),
        ({"high_quality": True}, "high_quality"),
    ],
)
def test_refiner_without_one_configured_names_the_field_and_setting(
    engine: Engine, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobError) as info:
        engine.plan(spec_of(**fields))
    assert info.value.field == field
    assert "SDWORKER_REFINER" in info.value.message


def test_refiner_off_without_one_configured_is_fine(engine: Engine) -> None:
    assert engine.plan(spec_of(refiner="off")).refiner is None


def test_upscale_jobs_take_no_refiner(refiner_engine: Engine) -> None:
    with pytest.raises(InvalidJobError) as info:
        refiner_engine.plan(JobSpec(image="in.png", upscaler="lanczos", refiner="ensemble"))
    assert info.value.field == "refiner"


def test_preset_high_on_an_upscale_job_is_not_refused(refiner_engine: Engine) -> None:
    plan = refiner_engine.plan(
        JobSpec(image="in.png", upscaler="hires", upscale_factor=2, preset="sdxl_image_high")
    )
    assert plan.refiner is None and plan.num_inference_steps == 25


def test_refine_mode_that_runs_no_refiner_step_is_an_invalid_job(refiner_engine: Engine) -> None:
    # steps 3 x default refiner_strength 0.3 = 0.9: no refiner step at all
    with pytest.raises(InvalidJobError) as info:
        refiner_engine.plan(spec_of(refiner="refine", steps=3))
    assert info.value.field in {"refiner_strength", "refiner_inference_steps"}


# -- progress ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ensemble_run", "refine_run"])
def test_progress_counts_on_across_base_and_refiner(
    which: str, request: pytest.FixtureRequest
) -> None:
    _, seen = request.getfixturevalue(which)
    steps = [step for step, _ in seen]
    assert steps == list(range(1, len(seen) + 1))  # one report per step, counting on
    total = seen[-1][1]
    assert seen[-1] == (total, total)
    assert all(step <= t for step, t in seen)
    percents = [step / t for step, t in seen]
    assert percents == sorted(percents)
    # ensemble: the base's timesteps of 4 at or above 500 (751, 501), then the refiner's
    # of 6 below it (499, 333, 167, 1); refine: 4 base steps, then int(4 * 0.5).
    assert total == {"ensemble_run": 2 + 4, "refine_run": 4 + 2}[which]


def test_ensemble_progress_total_is_right_from_the_first_step(refiner_engine: Engine) -> None:
    seen: list[tuple[int, int]] = []
    run(
        refiner_engine,
        spec_of(refiner="ensemble", steps=5, high_noise_frac=0.5, num_images=1),
        lambda s, t: seen.append((s, t)),
    )
    assert {total for _, total in seen} == {len(seen)}


# -- shared memory, settings -------------------------------------------------------------


def test_refiner_shares_the_base_vae_and_second_text_encoder(
    refiner_engine: Engine, ensemble_run: Any
) -> None:
    loaded = refiner_engine.load()
    refiner, base = loaded.refiner, loaded.pipelines.base
    assert refiner is not None
    assert refiner.vae is base.vae
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.tokenizer_2 is base.tokenizer_2
    assert refiner.text_encoder is None
    assert refiner.unet is not base.unet
    run(refiner_engine, spec_of(refiner="refine", **REFINE))
    assert refiner_engine.load().refiner is refiner  # loaded once, kept


REFINER_VARIABLES = ("SDWORKER_REFINER", "SDXL_REFINER_ID", "SDXL_REFINER_MODEL")


@pytest.mark.parametrize("variable", REFINER_VARIABLES)
def test_refiner_setting_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    for name in REFINER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert Settings(_env_file=None).refiner is None
    monkeypatch.setenv(variable, REFINER)
    settings = Settings(_env_file=None)
    assert settings.refiner == REFINER
    assert features_from_settings(
        settings, "tiny-sdxl", LoraLibrary.from_settings(settings)
    ).refiner


def test_sdworker_refiner_wins_over_the_legacy_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDXL_REFINER_MODEL", raising=False)
    monkeypatch.setenv("SDXL_REFINER_ID", "legacy-refiner")
    monkeypatch.setenv("SDWORKER_REFINER", REFINER)
    assert Settings(_env_file=None).refiner == REFINER


def test_a_base_model_as_refiner_is_refused_naming_the_setting(settings: Settings) -> None:
    engine = Engine(settings.model_copy(update={"refiner": "tiny-sdxl"}))
    with pytest.raises(ModelLoadError) as info:
        engine.run(spec_of(refiner="ensemble", steps=2, num_images=1))
    assert info.value.field == "refiner"
    assert "not an SDXL refiner" in info.value.message
    assert "SDWORKER_REFINER" in info.value.message


def _refiner_single_file(folder: Path, target: Path) -> Path:
    """The tiny refiner in the original single-file layout: the refiner's OpenCLIP is
    embedder 0 (it has no CLIP-L), which is how its family is told from the keys."""
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors.torch import save_file

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    state = {**unet_to_original(pipe.unet.state_dict()), **vae_to_original(pipe.vae.state_dict())}
    refiner_clip = OPEN_CLIP_PREFIX.replace("embedders.1.", "embedders.0.")
    for key, tensor in open_clip_to_original(pipe.text_encoder_2.state_dict()).items():
        state[key.replace(OPEN_CLIP_PREFIX, refiner_clip)] = tensor
    save_file({key: value.contiguous() for key, value in state.items()}, str(target))
    return target


def test_single_file_refiner_matches_the_folder_refiner(
    refiner_settings: Settings,
    cache_dir: Path,
    ensemble_run: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """load_refiner reads single files with the shipped configs/sdxl-refiner, which
    describe the real refiner's architecture, and no setting points it elsewhere
    (SDWORKER_MODEL_CONFIG is the base's): the test points the module's CONFIGS_DIR at
    the tiny refiner's configs (weights left out, so they can only come from the file)."""
    import sdworker.engine.refiner as refiner_module

    folder = ensure_tiny_model(REFINER, cache_dir)
    path = _refiner_single_file(folder, tmp_path / "refiner.safetensors")
    configs = tmp_path / "configs"
    shutil.copytree(
        folder,
        configs / "sdxl-refiner",
        ignore=shutil.ignore_patterns("*.safetensors", "*.bin"),
    )
    monkeypatch.setattr(refiner_module, "CONFIGS_DIR", configs)
    settings = refiner_settings.model_copy(update={"refiner": str(path)})
    source = resolve_model(str(path), settings)
    assert (source.kind, source.family) == (SourceKind.SINGLE_FILE, "sdxl-refiner")
    result = run(Engine(settings), spec_of(refiner="ensemble", **ENSEMBLE))
    assert_same_images(result.images, ensemble_run[0].images)


# -- watermark (pipeline option shared by the base and the refiner) ----------------------


def test_watermark_without_the_package_names_it(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers.utils

    # Not installed here; patched anyway so the test means the same on hosts that have it.
    monkeypatch.setattr(diffusers.utils, "is_invisible_watermark_available", lambda: False)
    engine = Engine(settings.model_copy(update={"watermark": True}))
    with pytest.raises(ModelLoadError) as info:
        engine.load()
    assert info.value.field == "watermark"
    assert "invisible-watermark" in info.value.message
    assert "sdworker[watermark]" in info.value.message


def test_watermark_option_is_explicit(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    import diffusers.utils

    assert pipeline_options(settings) == {"add_watermarker": False}
    monkeypatch.setattr(diffusers.utils, "is_invisible_watermark_available", lambda: True)
    watermarked = settings.model_copy(update={"watermark": True})
    assert pipeline_options(watermarked) == {"add_watermarker": True}


def test_default_pipelines_have_no_watermarker(refiner_engine: Engine, ensemble_run: Any) -> None:
    loaded = refiner_engine.load()
    pipes = [loaded.pipelines.for_task(task) for task in (Task.IMG2IMG, Task.INPAINT)]
    for pipe in [loaded.pipelines.base, loaded.refiner, *pipes]:
        assert hasattr(pipe, "watermark")  # diffusers' SDXL attribute name
        assert pipe.watermark is None


class _RecordingWatermarker:
    """Stands in for diffusers' StableDiffusionXLWatermarker; records every use."""

    calls: ClassVar[list[str]] = []

    def apply_watermark(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(type(images).__name__)
        return images


@pytest.fixture
def watermark_package_installed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """As if invisible-watermark were installed: diffusers' SDXL pipelines then add a
    watermarker unless told add_watermarker=False."""
    calls: ClassVar[list[str]] = []
    monkeypatch.setattr(_RecordingWatermarker, "calls", calls)
    for name in ("", "_img2img", "_inpaint"):
        module = importlib.import_module(
            f"diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl{name}"
        )
        monkeypatch.setattr(module, "is_invisible_watermark_available", lambda: True)
        monkeypatch.setattr(
            module, "StableDiffusionXLWatermarker", _RecordingWatermarker, raising=False
        )
    return calls


def test_base_pipeline_has_no_watermarker_when_the_package_is_installed(
    settings: Settings, watermark_package_installed: list[str]
) -> None:
    engine = Engine(settings)
    assert engine.load().pipelines.base.watermark is None
    run(engine, spec_of(steps=2, num_images=1))
    assert watermark_package_installed == []


def test_img2img_has_no_watermarker_when_the_package_is_installed(
    settings: Settings, watermark_package_installed: list[str], tmp_path: Path
) -> None:
    gradient_image().save(tmp_path / "init.png")
    engine = Engine(settings)
    run(engine, spec_of(image=str(tmp_path / "init.png"), strength=0.5, steps=2, num_images=1))
    assert engine.load().pipelines.for_task(Task.IMG2IMG).watermark is None
    assert watermark_package_installed == []
