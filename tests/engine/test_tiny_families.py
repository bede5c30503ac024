"""The tiny SD 1.5, SD 2.1, SD3 and Wan models: deterministic, family-shaped, reloadable."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdworker.engine.tiny import (
    TINY_FAMILIES,
    TINY_MODELS,
    TINY_SAFETY_CHECKER_FLAGS_ALL,
    build_tiny_pipeline,
    ensure_tiny_model,
    is_tiny_model,
    t5_tokenizer,
    tiny_family,
    umt5_tokenizer,
)

NEW_MODELS = ("tiny-sd15", "tiny-sd21", "tiny-sd3", "tiny-wan")
PIPELINE_CLASS = {
    "tiny-sd15": "StableDiffusionPipeline",
    "tiny-sd21": "StableDiffusionPipeline",
    "tiny-sd3": "StableDiffusion3Pipeline",
    "tiny-wan": "WanPipeline",
}
# (height, width, frames) of the 2-step runs; Wan sizes must be multiples of 16.
RUN_SIZE = {
    "tiny-sd15": (64, 64, None),
    "tiny-sd21": (64, 64, None),
    "tiny-sd3": (64, 64, None),
    "tiny-wan": (32, 32, 5),
}


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    built = {name: build_tiny_pipeline(name) for name in NEW_MODELS}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def _state(pipe: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            state |= {f"{name}.{key}": value for key, value in component.state_dict().items()}
    return state


def _run(pipe: Any, name: str, **options: Any) -> Any:
    """Two steps at the model's small size; the pixels as a numpy array."""
    height, width, frames = RUN_SIZE[name]
    if frames is not None:
        options["num_frames"] = frames
    out = pipe(
        "a red cat",
        negative_prompt="blurry",
        height=height,
        width=width,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    return out.frames if frames is not None else out.images


def _without_checker(pipe: Any) -> Any:
    """The same modules without the safety checker, as the engine loads SD 1.5 by default."""
    components = pipe.components | {"safety_checker": None, "feature_extractor": None}
    return type(pipe)(**components, requires_safety_checker=False)


def _load(name: str, folder: Path, **options: Any) -> Any:
    import diffusers

    pipe = getattr(diffusers, PIPELINE_CLASS[name]).from_pretrained(folder, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_names_and_families() -> None:
    assert TINY_MODELS == (
        "tiny-sdxl",
        "tiny-sdxl-refiner",
        "tiny-sd15",
        "tiny-sd21",
        "tiny-sd3",
        "tiny-wan",
    )
    assert {name: tiny_family(name) for name in TINY_MODELS} == TINY_FAMILIES
    assert all(is_tiny_model(name) for name in TINY_MODELS) and not is_tiny_model("sd15")
    for call in (tiny_family, build_tiny_pipeline):
        with pytest.raises(ValueError, match="unknown tiny model 'tiny-nope'"):
            call("tiny-nope")
    with pytest.raises(ValueError, match="unknown tiny model"):
        ensure_tiny_model("tiny-nope", Path("/nonexistent"))


@pytest.mark.parametrize("name", NEW_MODELS)
def test_weights_are_the_same_on_every_build(pipes: dict[str, Any], name: str) -> None:
    first, second = _state(pipes[name]), _state(build_tiny_pipeline(name))
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_building_does_not_disturb_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for name in NEW_MODELS:
        build_tiny_pipeline(name)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", NEW_MODELS)
def test_saved_folder_reloads_offline_and_gives_the_same_pixels(
    pipes: dict[str, Any], cache_dir: Path, name: str
) -> None:
    folder = ensure_tiny_model(name, cache_dir)
    assert folder.name == f"{name}-v1"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS[name]
    options = {"safety_checker": None} if name == "tiny-sd15" else {}
    in_memory = _without_checker(pipes[name]) if name == "tiny-sd15" else pipes[name]
    expected, reloaded = _run(in_memory, name), _run(_load(name, folder, **options), name)
    height, width, frames = RUN_SIZE[name]
    shape = (1, height, width, 3) if frames is None else (1, frames, height, width, 3)
    assert expected.shape == reloaded.shape == shape
    assert np.isfinite(expected).all() and expected.std() > 0
    # Not bit-exact: safetensors maps weights at unaligned addresses, which sends some
    # CPU kernels down a differently rounded path (seen as ~5e-6 on tiny-wan).
    np.testing.assert_allclose(reloaded, expected, atol=1e-4)


def test_sd21_has_the_sd2_traits_and_sd15_does_not(pipes: dict[str, Any]) -> None:
    sd15, sd21 = pipes["tiny-sd15"], pipes["tiny-sd21"]
    assert sd21.scheduler.config.prediction_type == "v_prediction"
    assert sd15.scheduler.config.prediction_type == "epsilon"
    assert sd21.unet.config.use_linear_projection is True
    assert sd15.unet.config.use_linear_projection is False
    assert isinstance(sd21.unet.config.attention_head_dim, list | tuple)
    assert sd21.text_encoder.config.hidden_act == "gelu"
    assert sd15.text_encoder.config.hidden_act == "quick_gelu"
    assert sd21.tokenizer.pad_token == "!" and sd15.tokenizer.pad_token == "<|endoftext|>"
    for pipe in (sd15, sd21):
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
        assert pipe.vae_scale_factor == 8 and pipe.vae.config.scaling_factor == 0.18215
    assert sd15.text_encoder.config.hidden_size != sd21.text_encoder.config.hidden_size
    assert sd15.config.requires_safety_checker and not sd21.config.requires_safety_checker
    assert sd21.safety_checker is None


def test_sd3_and_wan_have_their_family_shape(pipes: dict[str, Any]) -> None:
    sd3, wan = pipes["tiny-sd3"], pipes["tiny-wan"]
    assert sd3.default_sample_size * sd3.vae_scale_factor == 1024
    assert sd3.vae.config.latent_channels == sd3.transformer.config.in_channels == 16
    assert (sd3.vae.config.scaling_factor, sd3.vae.config.shift_factor) == (1.5305, 0.0609)
    assert sd3.transformer.config.patch_size == 2
    t5_width = sd3.text_encoder_3.config.d_model
    assert sd3.transformer.config.joint_attention_dim == t5_width
    clip_widths = sd3.text_encoder.config.hidden_size + sd3.text_encoder_2.config.hidden_size
    assert t5_width > clip_widths  # SD3 pads the CLIP embeddings up to the T5 width
    assert sd3.scheduler.config.shift == 3.0
    assert (wan.vae_scale_factor_temporal, wan.vae_scale_factor_spatial) == (4, 8)
    assert wan.transformer.config.text_dim == wan.text_encoder.config.d_model
    assert type(wan.text_encoder).__name__ == "UMT5EncoderModel"
    scheduler = wan.scheduler.config
    assert type(wan.scheduler).__name__ == "UniPCMultistepScheduler"
    assert (scheduler.prediction_type, scheduler.use_flow_sigmas) == ("flow_prediction", True)
    assert scheduler.flow_shift == 3.0


@pytest.mark.parametrize(
    ("make", "name", "encoder"),
    [(t5_tokenizer, "tiny-sd3", "text_encoder_3"), (umt5_tokenizer, "tiny-wan", "text_encoder")],
)
def test_t5_tokenizers_are_local_and_match_their_encoder(
    pipes: dict[str, Any], cache_dir: Path, make: Any, name: str, encoder: str
) -> None:
    tokenizer = make()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a red cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id and len(ids) == 4  # one piece per word
    padded = tokenizer("a red cat", padding="max_length", max_length=8).input_ids
    assert padded == [*ids, 0, 0, 0, 0]
    assert len(tokenizer) == getattr(pipes[name], encoder).config.vocab_size
    assert tokenizer("日本 café!").input_ids[-1] == 1  # unknown characters do not break it
    subfolder = "tokenizer_3" if name == "tiny-sd3" else "tokenizer"
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(ensure_tiny_model(name, cache_dir) / subfolder)
    for text in ("a red cat", "A photo of 2 horses, riding at sunset!", ""):
        assert reloaded(text).input_ids == tokenizer(text).input_ids


def test_tiny_safety_checker_flags_as_documented(pipes: dict[str, Any], cache_dir: Path) -> None:
    assert TINY_SAFETY_CHECKER_FLAGS_ALL
    folder = ensure_tiny_model("tiny-sd15", cache_dir)
    for pipe in (pipes["tiny-sd15"], _load("tiny-sd15", folder)):
        assert pipe.safety_checker is not None
        out = pipe(
            "a red cat",
            height=64,
            width=64,
            num_inference_steps=2,
            num_images_per_prompt=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        assert out.nsfw_content_detected == [True, True]
        assert not out.images.any()  # blacked out
    unchecked = _run(_load("tiny-sd15", folder, safety_checker=None), "tiny-sd15")
    assert unchecked.any()


def test_sdxl_cache_folders_keep_their_names(tiny_folder: Path) -> None:
    # Caches built before the other families existed must stay valid.
    assert tiny_folder.name == "tiny-sdxl-v2"
