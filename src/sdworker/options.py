"""Per-job generation options beyond the basics: refiner, LoRAs and styles, reference
images, upscaling and presets. Plain data, validated on construction, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

MAX_LORAS_PER_JOB = 8
LORA_WEIGHT_LIMIT = 4.0
DEFAULT_HIGH_NOISE_FRAC = 0.8
DEFAULT_REFINE_STRENGTH = 0.3
DEFAULT_HIRES_STRENGTH = 0.35
UPSCALE_FACTORS = (2, 4)


class RefinerMode(StrEnum):
    """How the SDXL refiner joins a job."""

    OFF = "off"
    ENSEMBLE = "ensemble"  # base stops at high_noise_frac, the refiner denoises the rest
    REFINE = "refine"  # img2img with the refiner over the finished base image


class ReferenceType(StrEnum):
    """What a reference image steers."""

    COMPOSITION = "composition"  # the image is the img2img starting point
    STYLE = "style"  # IP-Adapter on the style layers only (InstantStyle)
    CHARACTER = "character"  # IP-Adapter on every layer: subject and look


class Preset(StrEnum):
    """Named bundles of defaults; fields a request sets itself always win."""

    SDXL_IMAGE_FAST = "sdxl_image_fast"
    SDXL_IMAGE_HIGH = "sdxl_image_high"
    LCM = "lcm"
    TURBO = "turbo"


@dataclass(frozen=True)
class PresetDefaults:
    """What a preset sets: steps, guidance, scheduler, refiner, the LCM-LoRA."""

    description: str
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    refiner: RefinerMode | None = None
    lcm_lora: bool = False


PRESETS: dict[Preset, PresetDefaults] = {
    Preset.SDXL_IMAGE_FAST: PresetDefaults("15 steps", steps=15),
    Preset.SDXL_IMAGE_HIGH: PresetDefaults(
        "25 steps, with the refiner (ensemble) when one is configured",
        steps=25,
        refiner=RefinerMode.ENSEMBLE,
    ),
    Preset.LCM: PresetDefaults(
        "LCM-LoRA with the LCM scheduler: 4 steps, guidance 1.0 (SDWORKER_LCM_LORA)",
        steps=4,
        guidance_scale=1.0,
        scheduler="lcm",
        lcm_lora=True,
    ),
    Preset.TURBO: PresetDefaults(
        "adversarially distilled (SDXL-Turbo-style) model: 1 step, guidance 0",
        steps=1,
        guidance_scale=0.0,
        scheduler="euler_a",
    ),
}


class LoraRequest(BaseModel):
    """One LoRA of a job, by its name in the LoRA folder (file name without extension)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    weight: float = Field(default=1.0, ge=-LORA_WEIGHT_LIMIT, le=LORA_WEIGHT_LIMIT)


class StyleRequest(BaseModel):
    """A named style of the style registry at one of its strength levels (0 = off)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=255)
    level: int = Field(default=1, ge=0, description="1..levels of the style; 0 turns it off.")
