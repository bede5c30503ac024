"""The built-in tiny models: deterministic, SDXL-shaped, cached."""

from __future__ import annotations

from pathlib import Path

import torch

from sdworker.engine.tiny import build_tiny_pipeline, ensure_tiny_model
from tests.conftest import gradient_image


def _state(pipe: object) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        if module is not None:
            state |= {f"{name}.{key}": value for key, value in module.state_dict().items()}
    return state


def test_tiny_weights_are_the_same_on_every_build() -> None:
    first, second = (
        _state(build_tiny_pipeline("tiny-sdxl")),
        _state(build_tiny_pipeline("tiny-sdxl")),
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_building_does_not_disturb_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("tiny-sdxl")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_sdxl_has_the_sdxl_shape(tiny_folder: Path) -> None:
    pipe = build_tiny_pipeline("tiny-sdxl")
    assert pipe.vae_scale_factor == 8  # 512 px images are 64 px latents, like SDXL
    assert pipe.unet.config.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.tokenizer.model_max_length == 77 and pipe.tokenizer_2.pad_token == "!"


def test_refiner_shaped_tiny_model_runs_img2img() -> None:
    refiner = build_tiny_pipeline("tiny-sdxl-refiner")
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert refiner.unet.config.cross_attention_dim == refiner.text_encoder_2.config.hidden_size
    refiner.set_progress_bar_config(disable=True)
    image = refiner(
        "x", image=gradient_image(), strength=0.5, num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_ensure_tiny_model_builds_once(cache_dir: Path, tiny_folder: Path) -> None:
    stamp = (tiny_folder / "model_index.json").stat().st_mtime_ns
    assert ensure_tiny_model("tiny-sdxl", cache_dir) == tiny_folder
    assert (tiny_folder / "model_index.json").stat().st_mtime_ns == stamp
    assert not [
        p for p in tiny_folder.parent.iterdir() if p.name.startswith(".")
    ]  # no staging left
