"""Round trip: tiny diffusers SDXL -> original single file -> ``from_single_file`` -> same model.

``from_single_file`` is diffusers' own original -> diffusers converter, so an exact round trip
through it proves :mod:`sdworker.engine.ldm_layout` writes the layout diffusers (and the original
Stability code it mirrors) expects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from sdworker.engine import ldm_layout

CONFIGS = Path(ldm_layout.__file__).parent / "configs"
TOKENIZER_DIR = CONFIGS / "clip-tokenizer"

# diffusers tells the two text encoders apart in a single file only by the width of
# `conditioner.embedders.0...position_embedding` (== text_encoder hidden size) against the
# model it is building: with equal widths it loads CLIP-L's weights into text_encoder_2. Real
# SDXL (768 vs 1280) never collides; the tiny encoders must not either.
TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION, TIME_DIM = 32, 64, 32, 8


def _unet(down: tuple[str, ...], up: tuple[str, ...], channels: tuple[int, ...]) -> Any:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=channels,
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 1)[: len(channels)],
        attention_head_dim=(2, 4, 4)[: len(channels)],
        cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + TE2_PROJECTION,
        use_linear_projection=True,
    )


def _text_config(hidden: int, act: str) -> CLIPTextConfig:
    return CLIPTextConfig(
        hidden_size=hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=37,
        projection_dim=TE2_PROJECTION,
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act=act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _tiny_pipeline() -> Any:
    torch.manual_seed(0)
    unet = _unet(
        ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"), (32, 64)
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    text_encoder = CLIPTextModel(_text_config(TE1_HIDDEN, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(TE2_HIDDEN, "gelu"))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token="!"),
        unet=unet,
        scheduler=scheduler,
    )


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box OpenMP's
    spin-waiting turns a busy neighbour into 10x slower forwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The tiny pipeline and a config-only diffusers folder for it (weights removed)."""
    pipe = _tiny_pipeline()
    folder = tmp_path_factory.mktemp("tiny") / "folder"
    pipe.save_pretrained(folder)
    # Without weights in the folder a component diffusers fails to find in the single file
    # errors out instead of being silently read from the folder.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return pipe, folder


def _generate(pipe: Any) -> np.ndarray[Any, Any]:
    out = pipe(
        prompt="a red cube",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(1),
        output_type="np",
    )
    return np.asarray(out.images)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_round_trip_through_from_single_file(
    tiny: tuple[Any, Path], tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, folder = tiny
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = ldm_layout.save_single_file(pipe, tmp_path / f"tiny{suffix}")

    loaded = StableDiffusionXLPipeline.from_single_file(
        str(path),
        config=str(folder),
        tokenizer=pipe.tokenizer,
        tokenizer_2=pipe.tokenizer_2,
        local_files_only=True,
    )

    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        original, reloaded = getattr(pipe, name), getattr(loaded, name)
        expected = {**dict(original.named_parameters()), **dict(original.named_buffers())}
        actual = {**dict(reloaded.named_parameters()), **dict(reloaded.named_buffers())}
        assert actual.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert actual[key].device.type == "cpu", f"{name}.{key} not loaded"
            assert torch.equal(actual[key], tensor), f"{name}.{key} differs"
    np.testing.assert_array_equal(_generate(loaded), _generate(pipe))


def test_original_layout_names_and_shapes(tiny: tuple[Any, Path]) -> None:
    pipe, _ = tiny
    sd = ldm_layout.pipeline_to_original_state_dict(pipe)
    te2 = "conditioner.embedders.1.model."
    assert sd[te2 + "text_projection"].shape == (TE2_HIDDEN, TE2_PROJECTION)
    assert sd[te2 + "positional_embedding"].shape == (77, TE2_HIDDEN)
    in_proj = sd[te2 + "transformer.resblocks.2.attn.in_proj_weight"]
    assert in_proj.shape == (3 * TE2_HIDDEN, TE2_HIDDEN)
    assert sd[te2 + "transformer.resblocks.2.attn.in_proj_bias"].shape == (3 * TE2_HIDDEN,)
    te1 = "conditioner.embedders.0.transformer.text_model."
    assert sd[te1 + "embeddings.position_embedding.weight"].shape == (77, TE1_HIDDEN)
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    # layers_per_block 2: downsampler of block 0 at input_blocks.3, upsampler of the
    # attention up block 0 in slot 2 of output_blocks.2
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.1.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.2.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.up.0.block.1.conv1.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
    ):
        assert key in sd, key
    tensors = sum(
        len(m.state_dict()) for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    )
    # q/k/v weights and biases fuse into two tensors per OpenCLIP layer (3 layers)
    assert len(sd) == tensors - 3 * 4


def test_three_down_blocks_unet_round_trip() -> None:
    torch.manual_seed(0)
    unet = _unet(
        ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        (16, 32, 32),
    )
    original = ldm_layout.unet_to_original(unet.state_dict())
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    expected = unet.state_dict()
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[key], value) for key, value in expected.items())


def test_unknown_key_or_suffix_is_an_error(tiny: tuple[Any, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="text_encoder_2"):
        ldm_layout.open_clip_to_original({"text_model.pooler.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"\.bin"):
        ldm_layout.save_single_file(tiny[0], tmp_path / "model.bin")


@pytest.fixture(scope="module")
def sdxl_meta() -> dict[str, Any]:
    """Full-size SDXL base models from the shipped ``configs/sdxl-base``, on the meta device."""
    folder = CONFIGS / "sdxl-base"
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(folder, subfolder="unet")
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            ),
        }


def test_shipped_sdxl_base_configs(sdxl_meta: dict[str, Any]) -> None:
    """``configs/sdxl-base`` describes stabilityai/stable-diffusion-xl-base-1.0."""
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in sdxl_meta.items()}
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    folder = CONFIGS / "sdxl-base"
    scheduler = EulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.timestep_spacing == "leading"
    index = StableDiffusionXLPipeline.load_config(folder)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert not (folder / "tokenizer").exists()


def test_full_size_layout_matches_diffusers_reader(sdxl_meta: dict[str, Any]) -> None:
    """Names and shapes at real SDXL size survive diffusers' own original -> diffusers code."""
    states = {name: m.state_dict() for name, m in sdxl_meta.items()}
    sd = ldm_layout.sdxl_to_original_state_dict(
        states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"]
    )
    assert infer_diffusers_model_type(sd) == "xl_base"
    assert len(sd) == 1680 + 248 + 196 + 389
    back = {
        "unet": convert_ldm_unet_checkpoint(sd, dict(sdxl_meta["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(sd, dict(sdxl_meta["vae"].config)),
        "text_encoder": {
            k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()
        },
        "text_encoder_2": convert_open_clip_checkpoint(
            sdxl_meta["text_encoder_2"], sd, prefix=ldm_layout.OPEN_CLIP_PREFIX
        ),
    }
    for name, state in states.items():
        assert back[name].keys() == state.keys(), name
        assert all(back[name][k].shape == v.shape for k, v in state.items()), name
