"""Deterministic random-weight tiny models with the SDXL architecture.

They exercise every code path (two text encoders, pooled embeddings, micro-conditioning,
a VAE that downsamples by 8) in a fraction of a second on a CPU, need no download, and
are the default model of a fresh install. Their images are noise-like by design.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

# Bump when the architecture or seeding below changes: the cache folder is keyed by it.
TINY_VERSION = 2
TINY_MODELS = ("tiny-sdxl", "tiny-sdxl-refiner")

CLIP_TOKENIZER_DIR = Path(__file__).parent / "configs" / "clip-tokenizer"

_TIME_EMBED_DIM = 8
# The two encoders must differ in width, as CLIP-L (768) and OpenCLIP bigG (1280) do:
# diffusers' single-file loader tells them apart by it.
_TEXT_HIDDEN = 32
_TEXT_2_HIDDEN = 64


def is_tiny_model(name: str) -> bool:
    return name in TINY_MODELS


def clip_tokenizers() -> tuple[Any, Any]:
    """SDXL's two CLIP tokenizers from the shipped BPE files (they differ only in padding)."""
    from transformers import CLIPTokenizer

    first = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR))
    second = CLIPTokenizer.from_pretrained(str(CLIP_TOKENIZER_DIR), pad_token="!")
    return first, second


def _text_encoder(with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    hidden = _TEXT_2_HIDDEN if with_projection else _TEXT_HIDDEN
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu" if with_projection else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _unet(refiner: bool) -> Any:
    from diffusers import UNet2DConditionModel

    # Base: 6 micro-conditioning ids + pooled text; refiner: 5 ids (aesthetic score).
    time_ids = 5 if refiner else 6
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        # Attention only at 1/4 of the latent size keeps 1024 px cheap on a CPU.
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),
        cross_attention_dim=_TEXT_2_HIDDEN if refiner else _TEXT_HIDDEN + _TEXT_2_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED_DIM + _TEXT_2_HIDDEN,
        norm_num_groups=32,
    ).eval()


def _vae() -> Any:
    from diffusers import AutoencoderKL

    # Four blocks: three downsamplings, so latents are 1/8 of the image like SDXL's.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # The scheduler config of SDXL base 1.0.
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def build_tiny_pipeline(name: str) -> Any:
    """A fresh in-memory tiny pipeline; the same weights on every machine and run."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if not is_tiny_model(name):
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    import torch

    refiner = name.endswith("refiner")
    tokenizer, tokenizer_2 = clip_tokenizers()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        unet = _unet(refiner)
        torch.manual_seed(1)
        vae = _vae()
        torch.manual_seed(2)
        text_encoder = _text_encoder(with_projection=False)
        torch.manual_seed(3)
        text_encoder_2 = _text_encoder(with_projection=True)
    finally:
        torch.random.set_rng_state(generator_state)
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """The diffusers folder of a tiny model, built into the cache on first use."""
    target = cache_dir / "models" / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(name)
    # Build next to the target and rename, so concurrent builders never see half a folder.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
