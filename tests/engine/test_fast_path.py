"""The fast path (engine/runtime.py) and batched runs (Engine.run_batch) on the tiny model.

Tolerances, in 0-255 pixel units against plain diffusers with the same seeds:
- layout-only switches (channels_last, fused QKV): max |diff| <= 2;
- a bf16 VAE decode: max |diff| <= 12 and mean |diff| <= 1.5 (measured: 4 and 0.46);
  img2img/inpaint, which also encode in bf16: max <= 32, mean <= 2 (measured: 17, 1.04);
- a job in a batch vs the same job alone: max |diff| <= 2 (batched kernels round apart).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdworker.engine.arguments import check_batchable
from sdworker.engine.engine import Cancelled, Engine, EngineResult
from sdworker.engine.runtime import enable_compile_cache, resolve_speed_options
from sdworker.errors import InvalidJobError
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask, max_pixel_difference

SIZE = 64
STEPS = 3


def _mean_difference(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def _result(outcome: EngineResult | Cancelled | Any) -> EngineResult:
    assert isinstance(outcome, EngineResult)
    return outcome


def _spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {
        "prompt": "a red fox in snow",
        "width": SIZE,
        "height": SIZE,
        "scheduler": "euler",  # the tiny model's own scheduler, as plain diffusers uses it
        "guidance_scale": 5.0,
    }
    return JobSpec(**(base | {"steps": STEPS, "seed": 5} | fields))


@pytest.fixture(scope="module")
def diffusers_images(tiny_folder: Path) -> list[Any]:
    """Plain diffusers, default settings, 2 images of seeds 5 and 6."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder)
    pipe.set_progress_bar_config(disable=True)
    return list(
        pipe(
            prompt="a red fox in snow",
            width=SIZE,
            height=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=5.0,
            num_images_per_prompt=2,
            generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)],
        ).images
    )


# --------------------------------------------------------------------------- settings


@pytest.fixture
def clean_compile_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compile-cache variables, and whatever the test sets is undone afterwards."""
    for name in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "TORCHINDUCTOR_FX_GRAPH_CACHE",
        "TORCHINDUCTOR_AUTOGRAD_CACHE",
    ):
        monkeypatch.setenv(name, "")  # records the value to restore
        monkeypatch.delenv(name)


def test_cpu_defaults_keep_the_plain_eager_path(settings: Settings) -> None:
    speed = resolve_speed_options(
        settings, torch.device("cpu"), torch.float32, vae_force_upcast=True
    )
    assert speed.describe() == {
        "channels_last": False,
        "fuse_qkv": False,
        "fuse_unet_qkv": False,
        "vae_dtype": "model",
        "compile": "off",
        "compile_vae": False,
        "compile_mode": "default",
        "warmup": False,
    }


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bf16"), ((7, 5), "fp32")])
def test_cuda_defaults_turn_on_the_whole_fast_path(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    expected: str,
) -> None:
    """bf16 VAE on Ampere and later; fp32 where bf16 would only be emulated."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    speed = resolve_speed_options(
        settings, torch.device("cuda"), torch.float16, vae_force_upcast=True
    )
    assert speed.channels_last and speed.fuse_qkv and speed.compile_vae and speed.warmup
    assert speed.compile == "regional"
    assert speed.describe()["vae_dtype"] == expected


def test_mps_keeps_diffusers_own_vae_handling(settings: Settings) -> None:
    """diffusers moves an MPS VAE to the latents' dtype on each decode."""
    for setting in ("auto", "bf16"):
        chosen = settings.model_copy(update={"vae_dtype": setting})
        speed = resolve_speed_options(
            chosen, torch.device("mps"), torch.float16, vae_force_upcast=True
        )
        assert speed.vae_dtype is None and not speed.channels_last and speed.compile == "off"


def test_an_fp16_safe_vae_stays_in_fp16(settings: Settings) -> None:
    speed = resolve_speed_options(
        settings, torch.device("cuda"), torch.float16, vae_force_upcast=False
    )
    assert speed.vae_dtype is None


def test_explicit_switches_win_over_auto(settings: Settings) -> None:
    chosen = settings.model_copy(
        update={"channels_last": "off", "fuse_qkv": "off", "compile": "full", "warmup": "off"}
    )
    speed = resolve_speed_options(
        chosen, torch.device("cuda"), torch.float16, vae_force_upcast=False
    )
    assert (speed.channels_last, speed.fuse_qkv, speed.compile, speed.warmup) == (
        False,
        False,
        "full",
        False,
    )
    assert speed.compile_vae  # auto follows the UNet


def test_settings_read_the_switches_and_the_old_compile_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SDWORKER_COMPILE_UNET", "true")
    monkeypatch.setenv("SDWORKER_CHANNELS_LAST", "false")
    monkeypatch.setenv("SDWORKER_VAE_DTYPE", "bfloat16")
    monkeypatch.setenv("SDWORKER_BATCH_MAX_JOBS", "4")
    loaded = Settings(_env_file=None)
    assert (loaded.compile, loaded.channels_last, loaded.vae_dtype) == ("full", "off", "bf16")
    assert loaded.batch_max_jobs == 4


def test_a_bad_switch_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="'auto', 'off', 'regional' or 'full'"):
        Settings(_env_file=None, compile="sometimes")


@pytest.mark.usefixtures("clean_compile_env")
def test_the_compile_cache_goes_where_settings_say(tmp_path: Path) -> None:
    enable_compile_cache(tmp_path / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile" / "inductor")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "compile" / "triton")
    assert (tmp_path / "compile").is_dir()


# --------------------------------------------------------------------------- fidelity


@pytest.mark.parametrize(
    "switches",
    [{"channels_last": "on"}, {"fuse_qkv": "on"}, {"channels_last": "on", "fuse_qkv": "on"}],
)
def test_layout_switches_keep_diffusers_pixels(
    settings: Settings, diffusers_images: list[Any], switches: dict[str, str]
) -> None:
    fast = Engine(settings.model_copy(update=switches))
    result = _result(fast.run(_spec(num_images=2)))
    for ours, theirs in zip(result.images, diffusers_images, strict=True):
        assert max_pixel_difference(ours, theirs) <= 2
    pipe = fast.load().pipelines.base
    if switches.get("fuse_qkv"):
        assert any(type(p).__name__.startswith("Fused") for p in pipe.unet.attn_processors.values())
        # the separate projections the fused layers replace are freed
        attention = [m for m in pipe.unet.modules() if getattr(m, "fused_projections", False)]
        assert attention
        for module in attention:
            assert not hasattr(module, "to_k") and not hasattr(module, "to_v")
            assert hasattr(module, "to_q") == module.is_cross_attention
    if switches.get("channels_last"):
        weight = pipe.unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last)
        assert not weight.is_contiguous()


def test_a_bf16_vae_stays_close_to_diffusers(
    settings: Settings, diffusers_images: list[Any]
) -> None:
    fast = Engine(settings.model_copy(update={"vae_dtype": "bf16"}))
    result = _result(fast.run(_spec(num_images=2)))
    for ours, theirs in zip(result.images, diffusers_images, strict=True):
        assert 0 < max_pixel_difference(ours, theirs) <= 12  # > 0: the bf16 decode really ran
        assert _mean_difference(ours, theirs) <= 1.5
    vae = fast.load().pipelines.base.vae
    assert vae.dtype == torch.bfloat16 and not vae.config.force_upcast


def test_a_bf16_vae_survives_img2img_and_inpaint(settings: Settings, tmp_path: Path) -> None:
    """from_pipe casts shared modules to the pipeline dtype; the engine casts the VAE
    back, and the encode path accepts the UNet-dtype image."""
    gradient_image(SIZE, SIZE).save(tmp_path / "init.png")
    half_mask(SIZE, SIZE).save(tmp_path / "mask.png")
    plain, fast = Engine(settings), Engine(settings.model_copy(update={"vae_dtype": "bf16"}))
    for extra in ({"strength": 0.6}, {"mask": str(tmp_path / "mask.png")}):
        spec = _spec(image=str(tmp_path / "init.png"), **extra)
        ours, theirs = _result(fast.run(spec)), _result(plain.run(spec))
        # Encode and decode both in bf16 here (measured: max 17, mean 1.04).
        assert max_pixel_difference(ours.images[0], theirs.images[0]) <= 32
        assert _mean_difference(ours.images[0], theirs.images[0]) <= 2.0
        assert fast.load().pipelines.base.vae.dtype == torch.bfloat16


@pytest.mark.usefixtures("clean_compile_env")
# diffusers' upsampler calls an lru_cache'd version check, which dynamo traces through
# with a warning (harmless: the check is constant); the suite turns warnings into errors.
@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_the_whole_cuda_fast_path_keeps_diffusers_pixels(
    settings: Settings, diffusers_images: list[Any], tmp_path: Path
) -> None:
    """Every switch CUDA turns on by default, run here on the CPU: regional UNet compile,
    compiled VAE decoder, channels-last, fused QKV and a bf16 VAE."""
    fast = Engine(
        settings.model_copy(
            update={
                "compile": "regional",
                "compile_vae": "on",
                "channels_last": "on",
                "fuse_qkv": "on",
                "vae_dtype": "bf16",
                "warmup": "off",
                "compile_cache_dir": tmp_path / "compile",
            }
        )
    )
    pipe = fast.load().pipelines.base
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert pipe.unet._compiled_call_impl is None  # regional: the UNet itself stays eager
    assert pipe.vae.decoder._compiled_call_impl is not None
    result = _result(fast.run(_spec(num_images=2)))
    for ours, theirs in zip(result.images, diffusers_images, strict=True):
        assert max_pixel_difference(ours, theirs) <= 12
        assert _mean_difference(ours, theirs) <= 1.5


def test_warmup_runs_at_load(settings: Settings) -> None:
    warmed = Engine(settings.model_copy(update={"warmup": "on"}))
    first = _result(warmed.run(_spec()))  # loads the model, warm-up included
    loaded = warmed.load()
    assert loaded.speed.warmup and 0 < loaded.warmup_s < loaded.load_s
    assert first.timings["load_s"] == pytest.approx(loaded.load_s)
    assert _result(warmed.run(_spec())).timings["load_s"] == 0.0


# --------------------------------------------------------------------------- batching


def _alone_and_batched(engine: Engine, specs: list[JobSpec]) -> tuple[list[Any], list[Any]]:
    alone = [_result(engine.run(spec)) for spec in specs]
    batched = engine.run_batch(specs)
    assert not isinstance(batched, Cancelled)
    return alone, batched


def _assert_batch_equals_alone(alone: list[EngineResult], batched: list[EngineResult]) -> None:
    assert len(batched) == len(alone)
    for lone, joint in zip(alone, batched, strict=True):
        assert joint.seeds == lone.seeds
        assert len(joint.images) == len(lone.images)
        assert joint.batch_jobs == len(batched) and lone.batch_jobs == 1
        for a, b in zip(lone.images, joint.images, strict=True):
            assert max_pixel_difference(a, b) <= 2


def test_a_batch_gives_each_job_its_own_images(engine: Engine) -> None:
    specs = [
        _spec(prompt="a cat", seed=1, num_images=2, negative_prompt="blurry"),
        _spec(prompt="a dog on a long road", seed=7, negative_prompt="dark"),
        _spec(prompt="a boat", seed=9, num_images=3, negative_prompt="blurry"),
    ]
    alone, batched = _alone_and_batched(engine, specs)
    _assert_batch_equals_alone(alone, batched)
    # and the jobs really differ from each other
    assert max_pixel_difference(batched[0].images[0], batched[1].images[0]) > 10


def test_batched_img2img_and_single_image_inpaint(engine: Engine, tmp_path: Path) -> None:
    gradient_image(SIZE, SIZE).save(tmp_path / "a.png")
    gradient_image(SIZE, SIZE).rotate(90).save(tmp_path / "b.png")
    half_mask(SIZE, SIZE).save(tmp_path / "m.png")
    img2img = [
        _spec(prompt="one", seed=1, image=str(tmp_path / "a.png"), strength=0.6, num_images=2),
        _spec(prompt="two", seed=2, image=str(tmp_path / "b.png"), strength=0.6),
    ]
    _assert_batch_equals_alone(*_alone_and_batched(engine, img2img))
    inpaint = [
        _spec(prompt="one", seed=1, image=str(tmp_path / "a.png"), mask=str(tmp_path / "m.png")),
        _spec(prompt="two", seed=2, image=str(tmp_path / "b.png"), mask=str(tmp_path / "m.png")),
    ]
    _assert_batch_equals_alone(*_alone_and_batched(engine, inpaint))


def test_a_batch_splits_latents_per_job(engine: Engine) -> None:
    specs = [_spec(seed=1, num_images=2, return_latents=True), _spec(seed=3)]
    batched = engine.run_batch(specs)
    assert not isinstance(batched, Cancelled)
    latents = batched[0].latents
    assert latents is not None and latents.shape == (2, 4, SIZE // 8, SIZE // 8)
    assert batched[1].latents is None
    alone = _result(engine.run(specs[0]))
    assert alone.latents is not None
    ours = np.frombuffer(latents.data, dtype=np.float16)
    theirs = np.frombuffer(alone.latents.data, dtype=np.float16)
    assert np.allclose(ours, theirs, atol=1e-2)


@pytest.mark.parametrize(
    ("other", "field"),
    [
        ({"steps": STEPS + 1}, "num_inference_steps"),
        ({"width": SIZE * 2}, "width"),
        ({"guidance_scale": 2.0}, "guidance_scale"),
        ({"scheduler": "ddim"}, "scheduler"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
    ],
)
def test_incompatible_jobs_are_refused_as_a_batch(
    engine: Engine, other: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidJobError) as caught:
        check_batchable([engine.plan(_spec()), engine.plan(_spec(**other))])
    assert caught.value.field == field


def test_multi_image_inpainting_never_runs_in_a_batch(engine: Engine, tmp_path: Path) -> None:
    gradient_image(SIZE, SIZE).save(tmp_path / "a.png")
    half_mask(SIZE, SIZE).save(tmp_path / "m.png")
    paths = {"image": str(tmp_path / "a.png"), "mask": str(tmp_path / "m.png")}
    with pytest.raises(InvalidJobError, match="run alone"):
        engine.run_batch([_spec(num_images=2, **paths), _spec(**paths)])


def test_a_batch_can_be_cancelled_between_steps(engine: Engine) -> None:
    steps: list[int] = []
    outcome = engine.run_batch(
        [_spec(seed=1, steps=6), _spec(seed=2, steps=6)],
        on_step=lambda step, _total: steps.append(step),
        is_cancelled=lambda: len(steps) >= 2,
    )
    assert outcome == Cancelled(step=2, total_steps=6)
    assert steps == [1, 2]


def test_adapters_keep_the_unet_projections_unfused(settings: Settings) -> None:
    """LoRA and IP-Adapter layers wrap to_q/to_k/to_v, which fusing deletes: with
    adapters possible, only the VAE is fused."""
    speed = resolve_speed_options(
        settings.model_copy(update={"fuse_qkv": "on"}),
        torch.device("cpu"),
        torch.float32,
        vae_force_upcast=True,
        adapters=True,
    )
    assert speed.fuse_qkv and not speed.fuse_unet
    plain = resolve_speed_options(
        settings.model_copy(update={"fuse_qkv": "on"}),
        torch.device("cpu"),
        torch.float32,
        vae_force_upcast=True,
    )
    assert plain.fuse_unet


def test_a_lora_runs_on_an_engine_that_fuses_qkv(settings: Settings, tmp_path: Path) -> None:
    from sdworker.engine.tiny import build_tiny_pipeline
    from tests.support.adapter_builders import build_tiny_lora_peft

    build_tiny_lora_peft(build_tiny_pipeline("tiny-sdxl"), tmp_path / "ink.safetensors")
    engine = Engine(settings.model_copy(update={"fuse_qkv": "on", "lora_dir": tmp_path}))
    spec = _spec(loras=[{"name": "ink", "weight": 0.8}])
    result = engine.run(spec)
    assert isinstance(result, EngineResult) and result.warnings == []
    unet = engine.load().pipelines.base.unet
    attention = unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1
    assert hasattr(attention, "to_q") and not getattr(attention, "fused_projections", False)
    plain = Engine(settings).run(spec.model_copy(update={"loras": []}))
    assert isinstance(plain, EngineResult)
    assert max_pixel_difference(result.images[0], plain.images[0]) > 0
