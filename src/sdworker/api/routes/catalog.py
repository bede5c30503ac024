"""What jobs can name: LoRAs, styles and upscalers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sdworker.api.deps import ServicesDep
from sdworker.options import UPSCALE_FACTORS
from sdworker.planning import UPSCALE_RESAMPLERS

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/loras")
def list_loras(services: ServicesDep) -> dict[str, Any]:
    """LoRA files of the LoRA folder with their format and the model family they fit
    (from their cross-attention width), and the named styles."""
    library = services.library
    return {
        "loras": [lora.describe() for lora in library.catalog.list()],
        "styles": [style.describe() for style in library.styles.values()],
    }


@router.get("/upscalers")
def list_upscalers(services: ServicesDep) -> dict[str, Any]:
    """Upscalers a job's `upscaler` may name."""
    features = services.features_of(None)
    return {
        "upscalers": [*UPSCALE_RESAMPLERS, *features.upscalers],
        "factors": list(UPSCALE_FACTORS),
        "max_pixels": features.upscale_max_pixels,
    }
