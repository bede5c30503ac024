"""Engine behaviour: progress, cancellation, latents, shared components, switches, errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdworker.engine.engine import Cancelled, Engine
from sdworker.errors import InputImageError, InvalidJobError
from sdworker.families import Task
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask, max_pixel_difference


def test_on_step_reports_every_step(engine: Engine) -> None:
    seen: list[tuple[int, int]] = []
    engine.run(
        JobSpec(prompt="x", size="64x64", steps=4, seed=1), on_step=lambda s, t: seen.append((s, t))
    )
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_img2img_progress_counts_only_the_steps_that_run(engine: Engine, tmp_path: Path) -> None:
    gradient_image().save(tmp_path / "init.png")
    seen: list[tuple[int, int]] = []
    spec = JobSpec(
        prompt="x", image=str(tmp_path / "init.png"), size="64x64", steps=10, strength=0.5, seed=1
    )
    engine.run(spec, on_step=lambda s, t: seen.append((s, t)))
    assert seen[-1] == (5, 5) and len(seen) == 5


@pytest.mark.parametrize("cancel_after", [1, 3])
def test_cancel_stops_at_the_next_step(engine: Engine, cancel_after: int) -> None:
    seen: list[int] = []
    result = engine.run(
        JobSpec(prompt="x", size="64x64", steps=6, seed=1),
        on_step=lambda s, t: seen.append(s),
        is_cancelled=lambda: len(seen) >= cancel_after,
    )
    assert result == Cancelled(step=cancel_after, total_steps=6)
    assert seen == list(range(1, cancel_after + 1))


def test_engine_runs_normally_after_a_cancel(engine: Engine) -> None:
    spec = JobSpec(prompt="x", size="64x64", steps=3, seed=2)
    engine.run(spec, is_cancelled=lambda: True)
    first = engine.run(spec)
    assert not isinstance(first, Cancelled)
    assert max_pixel_difference(first.images[0], engine.run(spec).images[0]) == 0


def test_latents_are_float16_nchw_bytes(engine: Engine) -> None:
    result = engine.run(
        JobSpec(prompt="x", size="64x96", steps=2, seed=3, num_images=2, return_latents=True)
    )
    assert result.latents is not None
    assert result.latents.shape == (2, 4, 12, 8)  # N, C, H/8, W/8
    assert result.latents.dtype == "float16"
    array = np.frombuffer(result.latents.data, dtype=np.float16).reshape(result.latents.shape)
    assert np.isfinite(array).all() and array.std() > 0


def test_latents_decode_to_the_returned_images(engine: Engine) -> None:
    result = engine.run(JobSpec(prompt="x", size="64x64", steps=2, seed=4, return_latents=True))
    assert result.latents is not None
    pipe = engine.load().pipelines.base
    latents = torch.from_numpy(
        np.frombuffer(result.latents.data, dtype=np.float16).reshape(result.latents.shape).copy()
    ).float()
    with torch.inference_mode():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    # float16 storage of the latents costs a little precision, nothing more
    assert max_pixel_difference(image, result.images[0]) <= 3


def test_no_latents_unless_asked(engine: Engine) -> None:
    assert engine.run(JobSpec(prompt="x", size="64x64", steps=1, seed=1)).latents is None


def test_tasks_share_one_set_of_weights(engine: Engine, tmp_path: Path) -> None:
    gradient_image().save(tmp_path / "i.png")
    half_mask().save(tmp_path / "m.png")
    engine.run(JobSpec(prompt="x", image=str(tmp_path / "i.png"), size="64x64", steps=2, seed=1))
    engine.run(
        JobSpec(
            prompt="x",
            image=str(tmp_path / "i.png"),
            mask=str(tmp_path / "m.png"),
            size="64x64",
            steps=2,
            seed=1,
        )
    )
    pipelines = engine.load().pipelines
    base = pipelines.base
    for task in (Task.IMG2IMG, Task.INPAINT):
        derived = pipelines.for_task(task)
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            assert getattr(derived, name) is getattr(base, name)
        assert derived.unet.dtype == base.unet.dtype


def _final_latents(result: Any) -> np.ndarray:
    return np.frombuffer(result.latents.data, dtype=np.float16).reshape(result.latents.shape)


def test_exact_copy_mode_stays_close_to_the_input(engine: Engine, tmp_path: Path) -> None:
    init = gradient_image()
    init.save(tmp_path / "init.png")
    common = {"prompt": "", "image": str(tmp_path / "init.png"), "size": "64x64", "seed": 1}
    copy = engine.run(JobSpec(exact_copy_mode=True, return_latents=True, **common))
    assert copy.plan.strength == 0.05 and copy.plan.guidance_scale == 1.0
    assert 6 <= copy.plan.denoise_steps <= 10
    # The tiny VAE is random, so compare in latent space: the copy's final latents stay
    # near the input's encoding, much nearer than a strong img2img pass.
    pipe = engine.load().pipelines.base
    pixels = pipe.image_processor.preprocess(init)
    with torch.inference_mode():
        encoded = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    strong = engine.run(JobSpec(strength=0.9, steps=10, return_latents=True, **common))
    copy_gap = np.abs(_final_latents(copy) - encoded.numpy()).mean()
    strong_gap = np.abs(_final_latents(strong) - encoded.numpy()).mean()
    assert copy_gap < strong_gap / 4


def test_input_image_is_resized_with_the_stated_policy(engine: Engine, tmp_path: Path) -> None:
    gradient_image(128, 64).save(tmp_path / "wide.png")
    result = engine.run(
        JobSpec(
            prompt="x",
            image=str(tmp_path / "wide.png"),
            size="64x64",
            steps=2,
            strength=0.5,
            seed=1,
        )
    )
    assert result.images[0].size == (64, 64)
    assert result.plan.resize_mode.value == "crop"


def test_mask_of_another_size_is_rejected(engine: Engine, tmp_path: Path) -> None:
    gradient_image(64, 64).save(tmp_path / "i.png")
    half_mask(32, 32).save(tmp_path / "m.png")
    spec = JobSpec(
        prompt="x",
        image=str(tmp_path / "i.png"),
        mask=str(tmp_path / "m.png"),
        size="64x64",
        steps=2,
    )
    with pytest.raises(InputImageError, match="mask: is 32x32 but the image is 64x64") as info:
        engine.run(spec)
    assert info.value.field == "mask"


def test_missing_image_for_img2img_is_rejected(engine: Engine) -> None:
    with pytest.raises(InvalidJobError, match="image: img2img needs an input image"):
        engine.run(JobSpec(task="img2img", prompt="x", size="64x64"))


def test_unreadable_image_is_rejected(engine: Engine, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputImageError, match="image: not a readable image"):
        engine.run(JobSpec(prompt="x", image=str(tmp_path / "bad.png"), size="64x64"))


def test_device_and_dtype_on_cpu(engine: Engine) -> None:
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    result = engine.run(JobSpec(prompt="x", size="64x64", steps=1, seed=1))
    assert (result.device, result.dtype) == ("cpu", "fp32")


def test_memory_switches_are_applied(settings: Settings) -> None:
    switched = Engine(
        settings.model_copy(
            update={
                "attention_slicing": True,
                "vae_slicing": True,
                "vae_tiling": True,
                "enable_xformers": True,
                "compile": "full",
            }
        )
    )
    loaded = switched.load()
    pipe = loaded.pipelines.base
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert pipe.unet._compiled_call_impl is not None  # nn.Module.compile(): compiled in place
    processors = pipe.unet.attn_processors.values()
    assert all(type(p).__name__ == "SlicedAttnProcessor" for p in processors)
    assert any("xformers is not installed" in w for w in loaded.warnings)


def test_default_attention_is_sdpa(engine: Engine) -> None:
    processors = engine.load().pipelines.base.unet.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"AttnProcessor2_0"}


def test_cpu_offload_without_cuda_warns(settings: Settings) -> None:
    loaded = Engine(settings.model_copy(update={"cpu_offload": True})).load()
    assert any("cpu_offload needs a CUDA device" in w for w in loaded.warnings)


def test_seed_is_drawn_and_returned_when_not_given(engine: Engine) -> None:
    result = engine.run(JobSpec(prompt="x", size="64x64", steps=1, num_images=2))
    seed = result.seeds[0]
    assert result.seeds == [seed, (seed + 1) % 2**32]
    again = engine.run(JobSpec(prompt="x", size="64x64", steps=1, seed=seed))
    assert max_pixel_difference(again.images[0], result.images[0]) <= 1


@pytest.mark.parametrize("num_images", [1, 3, 6])
def test_batch_sizes_of_the_replaced_worker(engine: Engine, num_images: int) -> None:
    result = engine.run(JobSpec(prompt="x", size="64x64", steps=1, seed=1, num_images=num_images))
    assert len(result.images) == num_images == len(result.seeds)


def test_warnings_reach_the_result(engine: Engine, tmp_path: Path) -> None:
    gradient_image().save(tmp_path / "i.png")
    result = engine.run(
        JobSpec(
            prompt="",
            negative_prompt="ugly",
            image=str(tmp_path / "i.png"),
            exact_copy_mode=True,
            size="64x64",
            seed=1,
        )
    )
    assert "exact_copy_mode ignores negative_prompt" in result.warnings
    assert result.plan.negative_prompt is None


def test_timings_are_reported(engine: Engine) -> None:
    result: Any = engine.run(JobSpec(prompt="x", size="64x64", steps=1, seed=1))
    assert set(result.timings) == {"load_s", "inference_s"} and result.timings["inference_s"] > 0
