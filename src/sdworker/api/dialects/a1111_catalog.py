"""What AUTOMATIC1111 clients list and name: options, models, samplers, schedule types,
LoRAs, upscalers, and the listings sdworker has nothing for (empty, as an A1111 without
those extensions answers)."""

from __future__ import annotations

from typing import Any

from sdworker.api.deps import ServicesDep
from sdworker.api.dialects import a1111_spec as spec_of
from sdworker.api.routes.system import model_names
from sdworker.api.services import Services
from sdworker.errors import InvalidJobError
from sdworker.planning import UPSCALE_RESAMPLERS
from sdworker.settings import Settings
from sdworker.upscalers import upscaler_path

CHECKPOINT = "sd_model_checkpoint"
# Listings A1111 has and sdworker has nothing for.
EMPTY_LISTS = (
    "sd-vae",
    "hypernetworks",
    "face-restorers",
    "realesrgan-models",
    "prompt-styles",
    "latent-upscale-modes",
    "script-info",
    "extensions",
)


def default_options(settings: Settings) -> dict[str, Any]:
    """The A1111 options GET /options reports (and POST /options may change)."""
    return {
        CHECKPOINT: settings.model,
        "sd_checkpoint_hash": None,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0,
        "live_previews_enable": False,
        "show_progressbar": True,
        "sd_lora": "None",
    }


def resolve_model(services: Services, name: Any, where: str) -> str:
    """A model of GET /sd-models by name or title ("name [hash]", "name.safetensors")."""
    known = model_names(services)
    text = str(name).strip()
    for candidate in (text, text.split(" [")[0].strip()):
        for stem in (candidate, candidate.rsplit(".", 1)[0]):
            if stem in known:
                return stem
    raise InvalidJobError(
        f"{where}: unknown model {text!r}; known: {', '.join(known)}", field=where
    )


def upscaler_entries(services: Services) -> list[dict[str, Any]]:
    """GET /upscalers: None (no upscaling), Lanczos, Hires and the upscaler models."""
    folder = services.settings.upscaler_path
    entries: list[dict[str, Any]] = [{"name": "None", "model_name": None, "model_path": None}]
    entries += [
        {"name": name.capitalize(), "model_name": name, "model_path": None}
        for name in UPSCALE_RESAMPLERS
    ]
    for name in services.features_of(None).upscalers:
        path = upscaler_path(folder, name)  # the file name only, never the server's path
        entries.append({"name": name, "model_name": name, "model_path": path and path.name})
    return [entry | {"model_url": None, "scale": 4} for entry in entries]


def resolve_upscaler(services: Services, name: str | None) -> str | None:
    """upscaler_1 -> sdworker's upscaler name; None for "None" (no upscaling)."""
    if name is None or name.strip().lower() in {"", "none"}:
        return None
    known = [*UPSCALE_RESAMPLERS, *services.features_of(None).upscalers]
    for candidate in known:
        if candidate.lower() == name.strip().lower():
            return candidate
    labels = [n.capitalize() if n in UPSCALE_RESAMPLERS else n for n in known]
    raise InvalidJobError(
        f"upscaler_1: unknown upscaler {name!r}; allowed: {', '.join(['None', *labels])}",
        field="upscaler_1",
    )


def sd_models(services: ServicesDep) -> list[dict[str, Any]]:
    """A1111: the models override_settings.sd_model_checkpoint may name."""
    return [
        {"title": name, "model_name": name, "hash": None, "sha256": None}
        | {"filename": name, "config": None}
        for name in model_names(services)
    ]


def samplers() -> list[dict[str, Any]]:
    """A1111: samplers (DPM++ 2M Karras = DPM++ 2M with scheduler Karras)."""
    return spec_of.sampler_entries()


def schedulers() -> list[dict[str, Any]]:
    """A1111: schedule types: Automatic, and Karras with DPM++ 2M."""
    rho = {"Automatic": -1.0, "Karras": 7.0}
    return [
        {"name": kind.lower(), "label": kind, "aliases": None, "default_rho": rho[kind]}
        | {"need_inner_model": False}
        for kind in spec_of.SCHEDULE_TYPES
    ]


def loras(services: ServicesDep) -> list[dict[str, Any]]:
    """A1111: LoRAs, by the name <lora:name:weight> takes; path relative to the folder."""
    return [
        {"name": lora.name, "alias": lora.name, "path": f"{lora.name}.safetensors"}
        | {"metadata": {}}
        for lora in services.library.catalog.list()
    ]


def upscalers(services: ServicesDep) -> list[dict[str, Any]]:
    """A1111: upscalers extra-single-image's upscaler_1 may name."""
    return upscaler_entries(services)


def scripts() -> dict[str, list[str]]:
    """A1111: scripts (none; webuiapi reads this in its constructor)."""
    return {"txt2img": [], "img2img": []}


def cmd_flags() -> dict[str, Any]:
    return {"api": True, "nowebui": True}


def empty_list() -> list[Any]:
    return []


def nothing() -> None:
    return None
