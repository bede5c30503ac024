"""Health, status and metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from sdworker.api.deps import ServicesDep
from sdworker.api.services import Services
from sdworker.broker.base import WorkerInfo
from sdworker.engine.schedulers import scheduler_names
from sdworker.errors import SdworkerError
from sdworker.jobs import OutputFormat
from sdworker.options import PRESETS, Preset
from sdworker.planning import UPSCALE_RESAMPLERS

router = APIRouter(tags=["system"])

HealthStatus = Literal["healthy", "starting", "unhealthy"]


class Health(BaseModel):
    """Readiness. Besides sdworker's own fields it carries those that the health checks
    of the replaced services read (candle SD worker, Dream AI service), so their
    monitors work unchanged against the root /health."""

    status: HealthStatus
    model_loaded: bool
    device: str | None
    worker_id: str | None
    uptime_seconds: float
    model_version: str | None = Field(description="The model the worker serves.")
    pipeline_loaded: bool = Field(description="Same as model_loaded (Dream AI's name).")
    refiner_loaded: bool = Field(description="A live worker holds the refiner in memory.")
    gpu_available: bool = Field(description="A live worker runs on a CUDA device.")
    gpu_count: int = Field(description="CUDA devices of the live workers (host, device).")


def live_workers(services: Services, workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """The workers whose last heartbeat is within SDWORKER_HEARTBEAT_TIMEOUT_S."""
    horizon = services.settings.heartbeat_timeout_s
    now = datetime.now(UTC)
    return [w for w in workers if w.last_seen and (now - w.last_seen).total_seconds() < horizon]


def _features(services: Services) -> dict[str, Any]:
    settings, features = services.settings, services.features_of(None)
    return {
        "model_variant": features.variant,
        "refiner": settings.refiner,
        "loras": len(services.library.catalog.names()),
        "styles": sorted(services.library.styles),
        "lcm_lora": bool(settings.lcm_lora),
        "ip_adapter": features.ip_adapter,
        "upscalers": [*UPSCALE_RESAMPLERS, *features.upscalers],
        "upscale_max_pixels": features.upscale_max_pixels,
        "prompt_weighting": "prompt_weighting" in services.family_of(None).options,
        "safety_checker": settings.safety_checker,
        "watermark": settings.watermark,
    }


def _model_entry(services: Services, name: str, workers: list[WorkerInfo]) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "loaded_on": []}
    try:
        source = services.source_of(name)
        profile = services.family_of(name)
    except SdworkerError as exc:  # a broken entry is shown, not a failed /status
        return entry | {"family": None, "problem": exc.message}
    config = source.defaults
    entry |= {
        "family": profile.name,
        "label": profile.label,
        "tasks": sorted(task.value for task in profile.tasks),
        "kind": source.kind.value,
        "description": config.description,
        "defaults": {
            "width": config.width or profile.default_size[0],
            "height": config.height or profile.default_size[1],
            "steps": config.steps or profile.default_steps,
            "guidance_scale": config.guidance_scale
            if config.guidance_scale is not None
            else profile.default_guidance,
            "scheduler": config.scheduler or profile.default_scheduler,
        },
        "loaded_on": [w.id for w in workers if name in w.models_loaded],
    }
    return entry


def model_names(services: Services) -> list[str]:
    """The default model, the registry's and the video model, once each."""
    settings = services.settings
    names = [settings.model, *services.models]
    if settings.register_video_model:
        names.append(settings.video_model)
    return list(dict.fromkeys(names))


def _models(services: Services, workers: list[WorkerInfo]) -> list[dict[str, Any]]:
    return [_model_entry(services, name, workers) for name in model_names(services)]


def health_report(services: Services) -> Health:
    uptime = time.monotonic() - services.started_at
    live = live_workers(services, services.broker.workers())
    supervisor = services.supervisor
    if supervisor is not None:  # serve: judge by our own worker
        live = [w for w in live if w.id == supervisor.worker_id]
    worker = next((w for w in live if w.model_loaded), live[0] if live else None)
    if worker is not None and worker.model_loaded:
        status: HealthStatus = "healthy"
    elif worker is not None or uptime < services.settings.heartbeat_timeout_s:
        status = "starting"
    else:
        status = "unhealthy"
    gpus = {(w.host, w.device) for w in live if w.device.startswith("cuda")}
    loaded = bool(worker and worker.model_loaded)
    return Health(
        status=status,
        model_loaded=loaded,
        device=worker.device if worker else None,
        worker_id=worker.id if worker else None,
        uptime_seconds=round(uptime, 3),
        model_version=worker.model if worker else None,
        pipeline_loaded=loaded,
        refiner_loaded=any(w.refiner_loaded for w in live),
        gpu_available=bool(gpus),
        gpu_count=len(gpus),
    )


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(services: ServicesDep) -> JSONResponse:
    """Ready when a worker has its model loaded; 503 while starting or unhealthy."""
    report = health_report(services)
    return JSONResponse(
        report.model_dump(mode="json"), status_code=200 if report.status == "healthy" else 503
    )


@router.get("/status")
def status(services: ServicesDep) -> dict[str, Any]:
    """What this deployment serves and how busy it is."""
    return status_report(services)


def status_report(services: Services) -> dict[str, Any]:
    """The /status body (the edge dialect serves it under its prefix too)."""
    settings = services.settings
    stats = services.broker.stats()
    family = services.family_of(None)
    live = live_workers(services, stats.workers)
    return {
        "worker_type": "sdworker",
        "model": settings.model,
        "family": family.name,
        "batch_sizes": list(range(1, settings.max_num_images + 1)),
        "max_num_images": settings.max_num_images,
        "cross_job_batching": {
            "max_jobs": settings.batch_max_jobs,
            "max_images": settings.batch_max_images,
            "window_s": settings.batch_window_s,
        },
        "schedulers": scheduler_names(),
        "tasks": sorted(task.value for task in family.tasks),
        # The edge-function worker's fields (LUSTIFY SDXL): what its dispatcher reads.
        "batch_support": True,
        "quality_tiers": [Preset.SDXL_IMAGE_FAST.value, Preset.SDXL_IMAGE_HIGH.value],
        "i2i_pipeline": "img2img" in {task.value for task in family.tasks},
        # The replaced worker's field: its two quality tiers and their steps.
        "quality_presets": {
            p.value: PRESETS[p].steps for p in (Preset.SDXL_IMAGE_FAST, Preset.SDXL_IMAGE_HIGH)
        },
        "presets": {
            p.value: {
                "description": d.description,
                "steps": d.steps,
                "guidance_scale": d.guidance_scale,
                "scheduler": d.scheduler,
                "refiner": d.refiner.value if d.refiner else None,
                "lcm_lora": d.lcm_lora,
            }
            for p, d in PRESETS.items()
        },
        "features": _features(services),
        "output_formats": [fmt.value for fmt in OutputFormat],
        "thumbnail_generation": True,
        "queue": stats.queued,
        "running": stats.running,
        "models": _models(services, live),
        "video_model": settings.video_model if settings.register_video_model else None,
        "workers": [w.model_dump(mode="json") for w in live],
    }


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)
