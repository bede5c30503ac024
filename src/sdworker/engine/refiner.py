"""The SDXL refiner: loaded beside the base model, sharing its VAE and second text
encoder (the refiner was trained with both, so only its UNet is new memory)."""

from __future__ import annotations

from typing import Any

import torch

from sdworker.engine.models import CONFIGS_DIR, SourceKind, pipeline_options, resolve_model
from sdworker.engine.tiny import ensure_tiny_model
from sdworker.errors import ModelLoadError
from sdworker.settings import Settings


def load_refiner(settings: Settings, base: Any, dtype: torch.dtype) -> Any:
    """The refiner pipeline (img2img) of settings.refiner, on the CPU, sharing the base's
    VAE, second text encoder and tokenizer."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    assert settings.refiner
    source = resolve_model(settings.refiner, settings, trusted=True)
    if source.family != "sdxl-refiner":
        raise ModelLoadError(
            f"refiner {settings.refiner!r} is a {source.family} model, not an SDXL refiner "
            "(SDWORKER_REFINER)",
            field="refiner",
        )
    shared = {
        "vae": base.vae,
        "text_encoder_2": base.text_encoder_2,
        "tokenizer_2": base.tokenizer_2,
        **pipeline_options(settings),
    }
    try:
        if source.kind is SourceKind.SINGLE_FILE:
            pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
                source.location,
                config=str(CONFIGS_DIR / "sdxl-refiner"),
                local_files_only=True,
                dtype=dtype,
                **shared,
            )
        else:
            location = (
                ensure_tiny_model(source.location, settings.cache_dir)
                if source.kind is SourceKind.TINY
                else source.location
            )
            pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(location, dtype=dtype, **shared)
    except Exception as exc:  # diffusers raises many types for one cause: unusable weights
        raise ModelLoadError(
            f"refiner {settings.refiner!r} failed to load: {type(exc).__name__}: {exc}",
            field="refiner",
        ) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe
