"""Deterministic random-weight tiny models, one per family the service serves.

They exercise every code path of their family (for SDXL: two text encoders, pooled
embeddings, micro-conditioning, a VAE that downsamples by 8) in a fraction of a second
on a CPU, need no download, and tiny-sdxl is the default model of a fresh install.
Their images are noise-like by design. The SDXL pair is built here; the other families
live in tiny_families.py, whose docstring says what each keeps of the real model.

tiny-sd15 ships a safety checker that flags every image
(``TINY_SAFETY_CHECKER_FLAGS_ALL``): loaded with it, every image comes back black.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdworker.engine.tiny_families import (
    TINY_SAFETY_CHECKER_FLAGS_ALL,
    build_sd3,
    build_sd15,
    build_sd21,
    build_wan,
    clip_text_encoder,
    tiny_vae,
)
from sdworker.engine.tokenizers_local import (
    CLIP_TOKENIZER_DIR,
    clip_tokenizers,
    t5_tokenizer,
    umt5_tokenizer,
)

__all__ = [
    "CLIP_TOKENIZER_DIR",
    "TINY_FAMILIES",
    "TINY_MODELS",
    "TINY_SAFETY_CHECKER_FLAGS_ALL",
    "TINY_VERSION",
    "build_tiny_pipeline",
    "clip_tokenizers",
    "ensure_tiny_model",
    "is_tiny_model",
    "t5_tokenizer",
    "tiny_family",
    "umt5_tokenizer",
]

# The SDXL pair's version. Bump a model's version when its architecture or seeding
# changes: its cache folder is keyed by it, so stale caches are never reused.
TINY_VERSION = 2
_VERSIONS = {
    "tiny-sdxl": TINY_VERSION,
    "tiny-sdxl-refiner": TINY_VERSION,
    "tiny-sd15": 1,
    "tiny-sd21": 1,
    "tiny-sd3": 1,
    "tiny-wan": 1,
}
TINY_MODELS: tuple[str, ...] = (
    "tiny-sdxl",
    "tiny-sdxl-refiner",
    "tiny-sd15",
    "tiny-sd21",
    "tiny-sd3",
    "tiny-wan",
)
TINY_FAMILIES: dict[str, str] = {
    "tiny-sdxl": "sdxl",
    "tiny-sdxl-refiner": "sdxl-refiner",
    "tiny-sd15": "sd15",
    "tiny-sd21": "sd21",
    "tiny-sd3": "sd3",
    "tiny-wan": "wan-t2v",
}

_TIME_EMBED_DIM = 8
# The two encoders must differ in width, as CLIP-L (768) and OpenCLIP bigG (1280) do:
# diffusers' single-file loader tells them apart by it.
_TEXT_HIDDEN = 32
_TEXT_2_HIDDEN = 64


def is_tiny_model(name: str) -> bool:
    return name in TINY_FAMILIES


def tiny_family(name: str) -> str:
    if name not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(TINY_MODELS)}")
    return TINY_FAMILIES[name]


def _text_encoder(with_projection: bool, seed: int) -> Any:
    """CLIP-L-like (quick_gelu) or OpenCLIP-bigG-like (gelu, with projection), tiny."""
    hidden = _TEXT_2_HIDDEN if with_projection else _TEXT_HIDDEN
    act = "gelu" if with_projection else "quick_gelu"
    return clip_text_encoder(hidden, act, with_projection, seed)


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


def _build_sdxl(refiner: bool) -> Any:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    tokenizer, tokenizer_2 = clip_tokenizers()
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        unet = _unet(refiner)
        vae = tiny_vae(4, 1024, seed=1, scaling_factor=0.13025, force_upcast=True)
        text_encoder = _text_encoder(with_projection=False, seed=2)
        text_encoder_2 = _text_encoder(with_projection=True, seed=3)
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


_BUILDERS: dict[str, Callable[[], Any]] = {
    "tiny-sdxl": lambda: _build_sdxl(refiner=False),
    "tiny-sdxl-refiner": lambda: _build_sdxl(refiner=True),
    "tiny-sd15": build_sd15,
    "tiny-sd21": build_sd21,
    "tiny-sd3": build_sd3,
    "tiny-wan": build_wan,
}


def build_tiny_pipeline(name: str) -> Any:
    """A fresh in-memory tiny pipeline; the same weights on every machine and run."""
    tiny_family(name)  # unknown names fail here, with the list of known ones
    return _BUILDERS[name]()


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """The diffusers folder of a tiny model, built into the cache on first use."""
    tiny_family(name)
    target = cache_dir / "models" / f"{name}-v{_VERSIONS[name]}"
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
