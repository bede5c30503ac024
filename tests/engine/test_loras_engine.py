"""LoRAs, styles and presets on the engine, against plain diffusers.

Tiny random LoRA files (tests/support/adapter_builders.py) on the tiny SDXL model: the
engine's pixels equal diffusers' own `load_lora_weights` + `set_adapters`, switching
adapters between jobs leaks nothing and never reloads the model, the adapter cache stays
within its bound, a LoRA of another family is skipped with a warning, styles resolve to
the LoRA at their level, and the lcm/turbo presets set what they promise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import sdworker.engine.engine as engine_module
from sdworker.engine.engine import Engine, EngineResult
from sdworker.errors import InvalidJobError
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import max_pixel_difference
from tests.engine.test_fidelity import _reference_images
from tests.support.adapter_builders import (
    BENIGN_ADAPTER_WARNINGS,
    build_tiny_lora_for_sd15_like,
    build_tiny_lora_kohya,
    build_tiny_lora_peft,
)

pytestmark = [pytest.mark.filterwarnings(f) for f in BENIGN_ADAPTER_WARNINGS]

SIZE = 64
STEPS = 2
SEED = 4321
GUIDANCE = 6.0
PROMPT = "a lighthouse at dusk"
NEGATIVE = "blurry"
JOB: dict[str, Any] = {
    "prompt": PROMPT,
    "negative_prompt": NEGATIVE,
    "size": f"{SIZE}x{SIZE}",
    "steps": STEPS,
    "guidance_scale": GUIDANCE,
    "seed": SEED,
    "scheduler": "euler",
}
STYLE_LEVELS = [0.3, 0.5, 1.0]
STYLES_TOML = """
[styles.glow]
lora = "alpha"
levels = [0.3, 0.5, 1.0]
description = "alpha at three strengths"

[styles.other]
lora = "beta"
"""
STYLES_YAML = """
styles:
  glow:
    lora: alpha
    levels: [0.3, 0.5, 1.0]
    description: alpha at three strengths
  other:
    lora: beta
"""
# A style that claims the tiny width for the SD 1.5-like file: the header check passes,
# so the engine really tries to load it and diffusers fails half-way (size mismatch).
FORCED_TOML = """
[styles.forced]
lora = "sd15"
cross_attention_dim = 96
"""

Adapters = Sequence[tuple[Path, float]]


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_pipe(tiny_folder: Path) -> Any:
    import diffusers

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, reference_pipe: Any) -> dict[str, Path]:
    """LoRA folder (alpha, beta: PEFT; kohya: kohya SGM names; sd15: 768-dim), an LCM-LoRA
    outside it, and the style files. Built before the reference pipe holds any adapter."""
    root = tmp_path_factory.mktemp("loras-engine")
    folder = root / "loras"
    folder.mkdir()
    build_tiny_lora_peft(reference_pipe, folder / "alpha.safetensors", rank=4, seed=1)
    build_tiny_lora_peft(reference_pipe, folder / "beta.safetensors", rank=4, seed=2)
    build_tiny_lora_kohya(reference_pipe, folder / "kohya.safetensors", seed=3, naming="sgm")
    build_tiny_lora_for_sd15_like(reference_pipe, folder / "sd15.safetensors", seed=4)
    build_tiny_lora_peft(reference_pipe, root / "lcm-lora.safetensors", rank=4, seed=5)
    (root / "styles.toml").write_text(STYLES_TOML + FORCED_TOML)
    (root / "styles.yaml").write_text(STYLES_YAML)
    paths = {path.stem: path for path in folder.iterdir()}
    return paths | {
        "folder": folder,
        "lcm": root / "lcm-lora.safetensors",
        "toml": root / "styles.toml",
        "yaml": root / "styles.yaml",
    }


@pytest.fixture(scope="module")
def make_settings(cache_dir: Path, files: dict[str, Path]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "cache_dir": cache_dir,
            "device": "cpu",
            "model": "tiny-sdxl",
            "lora_dir": files["folder"],
        }
        return Settings(_env_file=None, **(values | overrides))

    return make


@pytest.fixture(scope="module")
def lora_engine(make_settings: Callable[..., Settings], files: dict[str, Path]) -> Engine:
    """The main engine: LoRA folder, TOML styles, LCM-LoRA, default adapter cache (8)."""
    return Engine(make_settings(styles_file=files["toml"], lcm_lora=str(files["lcm"])))


@pytest.fixture(scope="module")
def small_cache_engine(make_settings: Callable[..., Settings], files: dict[str, Path]) -> Engine:
    """One adapter at most; its styles come from the YAML file."""
    return Engine(make_settings(styles_file=files["yaml"], lora_cache_size=1))


@pytest.fixture(scope="module")
def reference(reference_pipe: Any) -> Callable[..., Image.Image]:
    """Plain diffusers: the adapters loaded with load_lora_weights, set_adapters with the
    weights, the job's seed, steps, size, guidance and scheduler; adapters deleted again
    afterwards. Memoised: several tests compare with the same images."""
    memo: dict[tuple[Any, ...], Image.Image] = {}

    def images(
        adapters: Adapters = (), *, scheduler: str = "euler", steps: int = STEPS, **job: Any
    ) -> Image.Image:
        call = {"guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE} | job
        key = (tuple(adapters), scheduler, steps, tuple(sorted(call.items())))
        if key not in memo:
            names = [f"ref{index}" for index in range(len(adapters))]
            for name, (path, _) in zip(names, adapters, strict=True):
                reference_pipe.load_lora_weights(str(path), adapter_name=name)
            try:
                if names:
                    weights = [weight for _, weight in adapters]
                    reference_pipe.set_adapters(names, adapter_weights=weights)
                (memo[key],) = _reference_images(
                    reference_pipe,
                    scheduler,
                    [SEED],
                    prompt=PROMPT,
                    width=SIZE,
                    height=SIZE,
                    num_inference_steps=steps,
                    **call,
                )
            finally:
                if names:
                    reference_pipe.delete_adapters(names)
        return memo[key]

    images()  # the plain image first, while the pipeline has never held an adapter
    return images


def run(engine: Engine, **job: Any) -> EngineResult:
    result = engine.run(JobSpec(**(JOB | job)))
    assert isinstance(result, EngineResult)
    assert len(result.images) == 1
    return result


def assert_same(image: Image.Image, expected: Image.Image) -> None:
    assert image.size == expected.size == (SIZE, SIZE)
    assert max_pixel_difference(image, expected) <= 1


def adapters_in_model(engine: Engine) -> set[str]:
    """Adapter names PEFT holds in the pipeline's UNet and text encoders."""
    pipe = engine.load().pipelines.base
    return {name for names in pipe.get_list_adapters().values() for name in names}


# -- fidelity ---------------------------------------------------------------------------


def test_a_peft_lora_matches_diffusers(
    lora_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    ours = run(lora_engine, loras=[{"name": "alpha", "weight": 0.7}])
    assert ours.warnings == []
    assert_same(ours.images[0], reference([(files["alpha"], 0.7)]))
    # The LoRA is not a no-op: the comparison above could not pass without applying it.
    assert max_pixel_difference(ours.images[0], reference()) > 8


def test_a_kohya_sgm_lora_matches_diffusers(
    lora_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    ours = run(lora_engine, loras=[{"name": "kohya", "weight": 0.7}])
    assert ours.warnings == []
    assert_same(ours.images[0], reference([(files["kohya"], 0.7)]))
    assert max_pixel_difference(ours.images[0], reference()) > 8


def test_two_loras_at_once_match_diffusers_with_their_weights(
    lora_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    ours = run(
        lora_engine,
        loras=[{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": 0.3}],
    )
    assert ours.warnings == []
    expected = reference([(files["alpha"], 0.7), (files["beta"], 0.3)])
    assert_same(ours.images[0], expected)
    # The second adapter counts: the first alone gives another image.
    assert max_pixel_difference(expected, reference([(files["alpha"], 0.7)])) > 1


# -- switching --------------------------------------------------------------------------


def test_switching_a_none_b_leaks_nothing_and_never_reloads_the_model(
    lora_engine: Engine,
    make_settings: Callable[..., Settings],
    reference: Callable[..., Image.Image],
    files: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded = lora_engine.load()
    unet = loaded.pipelines.base.unet
    real_load = engine_module.load_pipeline
    loads: list[Any] = []

    def counting_load(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine_module, "load_pipeline", counting_load)
    with_a = run(lora_engine, loras=[{"name": "alpha", "weight": 0.7}])
    without = run(lora_engine)
    with_b = run(lora_engine, loras=[{"name": "beta", "weight": 0.7}])
    assert loads == []
    assert lora_engine.load() is loaded and loaded.pipelines.base.unet is unet
    assert [r.timings["load_s"] for r in (with_a, without, with_b)] == [0.0, 0.0, 0.0]
    assert {"sdw-alpha", "sdw-beta"} <= set(loaded.adapters.loaded)  # kept for later jobs
    assert max_pixel_difference(with_a.images[0], with_b.images[0]) > 1

    monkeypatch.setattr(engine_module, "load_pipeline", real_load)
    fresh = Engine(make_settings())  # never saw A
    fresh_none = run(fresh)
    fresh_b = run(fresh, loras=[{"name": "beta", "weight": 0.7}])
    assert_same(without.images[0], fresh_none.images[0])
    assert_same(with_b.images[0], fresh_b.images[0])
    assert_same(with_b.images[0], reference([(files["beta"], 0.7)]))


def test_a_batch_shares_one_set_of_loras_and_gives_each_job_its_own_image(
    lora_engine: Engine,
) -> None:
    lora = [{"name": "alpha", "weight": 0.7}]
    first, second = JobSpec(**JOB, loras=lora), JobSpec(**(JOB | {"seed": SEED + 1}), loras=lora)
    batch = lora_engine.run_batch([first, second])
    assert isinstance(batch, list) and len(batch) == 2
    assert_same(batch[0].images[0], run(lora_engine, loras=lora).images[0])
    assert_same(batch[1].images[0], run(lora_engine, seed=SEED + 1, loras=lora).images[0])
    other = JobSpec(**JOB, loras=[{"name": "alpha", "weight": 0.3}])
    with pytest.raises(InvalidJobError) as caught:
        lora_engine.run_batch([first, other])
    assert caught.value.field == "loras"


# -- another family ---------------------------------------------------------------------


def test_a_768_lora_is_skipped_with_a_warning_and_the_image_has_no_lora(
    lora_engine: Engine, reference: Callable[..., Image.Image]
) -> None:
    run(lora_engine, loras=[{"name": "alpha", "weight": 0.7}])  # something active before
    result = run(lora_engine, loras=[{"name": "sd15", "weight": 1.0}])
    skipped = [warning for warning in result.warnings if "'sd15'" in warning]
    assert len(skipped) == 1, result.warnings
    assert "skipped" in skipped[0] and "768" in skipped[0]
    assert_same(result.images[0], reference())
    assert "sdw-sd15" not in adapters_in_model(lora_engine)


def test_a_lora_whose_load_fails_half_way_is_skipped_and_leaves_nothing_behind(
    lora_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    result = run(lora_engine, style={"name": "forced", "level": 1})
    assert any("'sd15'" in w and "skipped" in w for w in result.warnings), result.warnings
    assert_same(result.images[0], reference())
    assert "sdw-forced" not in adapters_in_model(lora_engine)
    after = run(lora_engine, loras=[{"name": "alpha", "weight": 0.7}])
    assert after.warnings == []
    assert_same(after.images[0], reference([(files["alpha"], 0.7)]))


# -- the adapter cache ------------------------------------------------------------------


def test_a_cache_of_one_adapter_switches_correctly_and_holds_at_most_one(
    small_cache_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    for name in ("alpha", "beta", "alpha"):
        result = run(small_cache_engine, loras=[{"name": name, "weight": 0.7}])
        assert result.warnings == []
        assert_same(result.images[0], reference([(files[name], 0.7)]))
        assert small_cache_engine.load().adapters.loaded == [f"sdw-{name}"]
        assert adapters_in_model(small_cache_engine) == {f"sdw-{name}"}


def test_a_job_with_more_loras_than_the_cache_holds_still_runs(
    small_cache_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    result = run(
        small_cache_engine,
        loras=[{"name": "alpha", "weight": 0.7}, {"name": "beta", "weight": 0.3}],
    )
    assert_same(result.images[0], reference([(files["alpha"], 0.7), (files["beta"], 0.3)]))


# -- styles -----------------------------------------------------------------------------


@pytest.mark.parametrize("registry", ["toml", "yaml"])
def test_style_levels_are_the_lora_at_the_level_weight(
    registry: str,
    lora_engine: Engine,
    small_cache_engine: Engine,
    reference: Callable[..., Image.Image],
    files: dict[str, Path],
) -> None:
    engine = lora_engine if registry == "toml" else small_cache_engine
    level_2 = run(engine, style={"name": "glow", "level": 2})
    assert level_2.plan.loras[0].weight == STYLE_LEVELS[1]
    assert level_2.plan.loras[0].path == files["alpha"]
    as_lora = run(engine, loras=[{"name": "alpha", "weight": 0.5}])
    assert_same(level_2.images[0], as_lora.images[0])
    assert_same(level_2.images[0], reference([(files["alpha"], 0.5)]))
    level_0 = engine.plan(JobSpec(**JOB, style={"name": "glow", "level": 0}))
    assert level_0.loras == ()
    if registry == "toml":  # one run of level 0 is enough
        assert_same(run(engine, style={"name": "glow", "level": 0}).images[0], reference())


def plan_error(engine: Engine, **job: Any) -> InvalidJobError:
    with pytest.raises(InvalidJobError) as caught:
        engine.plan(JobSpec(**(JOB | job)))
    return caught.value


def test_a_style_level_past_the_last_is_refused_naming_style_level(lora_engine: Engine) -> None:
    error = plan_error(lora_engine, style={"name": "glow", "level": 4})
    assert error.field == "style.level"
    assert "style.level" in error.message and "3" in error.message
    assert lora_engine.plan(JobSpec(**JOB, style={"name": "glow", "level": 3})).loras


def test_an_unknown_style_is_refused_listing_the_known_ones(lora_engine: Engine) -> None:
    error = plan_error(lora_engine, style={"name": "neon", "level": 1})
    assert error.field == "style.name"
    assert "'neon'" in error.message
    for known in ("glow", "other", "forced"):
        assert known in error.message


def test_an_unknown_lora_is_refused_listing_the_known_ones(lora_engine: Engine) -> None:
    error = plan_error(lora_engine, loras=[{"name": "gamma"}])
    assert error.field == "loras[0].name"
    assert "'gamma'" in error.message
    for known in ("alpha", "beta", "kohya", "sd15"):
        assert known in error.message
    second = plan_error(lora_engine, loras=[{"name": "alpha"}, {"name": "gamma"}])
    assert second.field == "loras[1].name"


def test_the_same_lora_twice_is_refused(lora_engine: Engine) -> None:
    error = plan_error(lora_engine, loras=[{"name": "alpha"}, {"name": "alpha", "weight": 0.2}])
    assert error.field.startswith("loras[")
    assert "alpha" in error.message and "twice" in error.message


# -- presets ----------------------------------------------------------------------------


def test_the_lcm_preset_plans_four_steps_guidance_one_lcm_and_applies_the_lcm_lora(
    lora_engine: Engine, reference: Callable[..., Image.Image], files: dict[str, Path]
) -> None:
    job = {"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "seed": SEED, "preset": "lcm"}
    plan = lora_engine.plan(JobSpec(**job))
    assert (plan.num_inference_steps, plan.guidance_scale, plan.scheduler) == (4, 1.0, "lcm")
    assert [(lora.path, lora.weight) for lora in plan.loras] == [(files["lcm"], 1.0)]
    result = lora_engine.run(JobSpec(**job))
    assert isinstance(result, EngineResult)
    expected = reference(
        [(files["lcm"], 1.0)], scheduler="lcm", steps=4, guidance_scale=1.0, negative_prompt=None
    )
    assert_same(result.images[0], expected)


def test_the_lcm_preset_without_an_lcm_lora_names_the_setting(
    make_settings: Callable[..., Settings],
) -> None:
    engine = Engine(make_settings())
    error = plan_error(engine, preset="lcm")
    assert error.field == "preset"
    assert "SDWORKER_LCM_LORA" in error.message
    # An LCM model needs no LoRA for its own preset.
    lcm_model = Engine(make_settings(model_variant="lcm"))
    plan = lcm_model.plan(JobSpec(prompt=PROMPT, size="64x64"))
    assert (plan.num_inference_steps, plan.guidance_scale, plan.scheduler) == (4, 1.0, "lcm")
    assert plan.loras == ()


def test_a_turbo_model_defaults_plain_jobs_to_one_step_without_guidance(
    make_settings: Callable[..., Settings],
) -> None:
    turbo = Engine(make_settings(model_variant="turbo"))
    plan = turbo.plan(JobSpec(prompt=PROMPT, size="64x64"))
    assert (plan.num_inference_steps, plan.guidance_scale) == (1, 0.0)
    assert plan.loras == ()
    standard = Engine(make_settings()).plan(JobSpec(prompt=PROMPT, size="64x64"))
    assert (standard.num_inference_steps, standard.guidance_scale) != (1, 0.0)
    own = turbo.plan(JobSpec(prompt=PROMPT, size="64x64", steps=3, guidance_scale=2.0))
    assert (own.num_inference_steps, own.guidance_scale) == (3, 2.0)
