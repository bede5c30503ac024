"""The model registry: the models one deployment serves, by name, with their own
defaults. Plain data, no torch: the API validates model names with it too.

Configured by SDWORKER_MODELS, a TOML/YAML/JSON file or inline JSON:

    [models.sd15]
    source = "stable-diffusion-v1-5"   # under the model root, a path, a hub id or tiny-*
    steps = 25

    [models.sd35-turbo]
    source = "stabilityai/stable-diffusion-3.5-large-turbo"
    variant = "turbo"
    steps = 4
    guidance_scale = 0.0
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sdworker.engine.schedulers import canonical_scheduler
from sdworker.errors import SdworkerError
from sdworker.families import Task
from sdworker.jobs import MAX_STEPS, JobSpec
from sdworker.settings import Settings

FamilyName = Literal["sd15", "sd21", "sdxl", "sd3", "wan-t2v"]


class ModelRegistryError(SdworkerError):
    """The model registry setting is unusable (the message names the entry and field)."""

    code = "invalid_settings"


class ModelConfig(BaseModel):
    """One registry entry: where the model is and what its jobs default to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1, description="Name under the model root, path, hub id.")
    family: FamilyName | None = Field(default=None, description="Detected when omitted.")
    description: str = ""
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    width: int | None = Field(default=None, ge=8)
    height: int | None = Field(default=None, ge=8)
    scheduler: str | None = None
    variant: Literal["standard", "turbo", "lcm"] | None = None
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description="Override (e.g. an SD 2.x 768 single file: v_prediction)."
    )
    config_dir: str | None = Field(
        default=None,
        description="Single files: the diffusers config folder of their architecture.",
    )
    memory_gb: float | None = Field(
        default=None, gt=0, description="Memory it takes when loaded (default: counted)."
    )

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str | None) -> str | None:
        return canonical_scheduler(value)


def _parse(text: str, where: str, suffix: str) -> object:
    if suffix in {".yaml", ".yml"}:
        import yaml

        return yaml.safe_load(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    return json.loads(text)


def _read(setting: str) -> tuple[object, str]:
    if setting.lstrip().startswith("{"):
        return json.loads(setting), "SDWORKER_MODELS (inline JSON)"
    path = Path(setting).expanduser()
    return _parse(path.read_text(), str(path), path.suffix.lower()), str(path)


def load_model_registry(settings: Settings) -> dict[str, ModelConfig]:
    """The registry of settings (empty when none is configured), plus the video model
    when register_video_model (DOWNLOAD_WAN2_MODEL) is on."""
    entries: dict[str, ModelConfig] = {}
    if settings.models:
        try:
            data, where = _read(settings.models)
        except Exception as exc:  # OSError, JSON/TOML/YAML errors: the setting is unusable
            raise ModelRegistryError(
                f"SDWORKER_MODELS {settings.models!r}: {type(exc).__name__}: {exc}",
                field="models",
            ) from exc
        table = data.get("models", data) if isinstance(data, dict) else None
        if not isinstance(table, dict):
            raise ModelRegistryError(
                f"{where}: expected a `models` table of name -> {{source, ...}}", field="models"
            )
        for name, entry in table.items():
            entries[str(name)] = _entry(str(name), entry, where)
    if settings.register_video_model and settings.video_model not in entries:
        entries[settings.video_model] = ModelConfig(
            source=settings.video_model, family="wan-t2v", description="video model"
        )
    return entries


def _entry(name: str, entry: object, where: str) -> ModelConfig:
    if isinstance(entry, str):
        entry = {"source": entry}
    try:
        return ModelConfig.model_validate(entry)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'entry'}: "
            f"{str(error['msg']).removeprefix('Value error, ')}"
            for error in exc.errors()
        )
        raise ModelRegistryError(f"{where}: model {name!r}: {problems}", field="models") from None


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory_size(text: str) -> int | None:
    """'20GB', '512MiB', '1.5g' or plain bytes -> bytes; 'auto' -> None (the caller's
    default). Binary units: GPU memory is reported in GiB."""
    if text.strip().lower() == "auto":
        return None
    match = _SIZE_RE.match(text)
    if not match:
        raise ModelRegistryError(
            f"model_memory_budget {text!r}: give a size such as 20GB, 512MB or auto",
            field="model_memory_budget",
        )
    unit = (match[2] or "").lower()[:1]
    return int(float(match[1]) * _UNITS[unit])


def default_model_for(spec: JobSpec, settings: Settings) -> str:
    """The model a job runs on: its own choice, else the video model for a text-to-video
    job (when one is registered), else the deployment's default."""
    if spec.model:
        return spec.model
    wants_video = spec.task is Task.TEXT2VIDEO or (spec.task is None and spec.has_video_fields)
    if wants_video and settings.register_video_model:
        return settings.video_model
    return settings.model
