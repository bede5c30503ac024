"""Health, status and metrics."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from sdworker.api.deps import ServicesDep
from sdworker.api.services import Services
from sdworker.broker.base import WorkerInfo
from sdworker.engine.schedulers import scheduler_names
from sdworker.jobs import OutputFormat
from sdworker.options import PRESETS, Preset
from sdworker.planning import UPSCALE_RESAMPLERS

router = APIRouter(tags=["system"])

HealthStatus = Literal["healthy", "starting", "unhealthy"]


class Health(BaseModel):
    status: HealthStatus
    model_loaded: bool
    device: str | None
    worker_id: str | None
    uptime_seconds: float


def _live_workers(services: Services, workers: list[WorkerInfo]) -> list[WorkerInfo]:
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
        "prompt_weighting": True,
        "safety_checker": False,
        "watermark": settings.watermark,
    }


def _health(services: Services) -> Health:
    uptime = time.monotonic() - services.started_at
    live = _live_workers(services, services.broker.workers())
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
    return Health(
        status=status,
        model_loaded=bool(worker and worker.model_loaded),
        device=worker.device if worker else None,
        worker_id=worker.id if worker else None,
        uptime_seconds=round(uptime, 3),
    )


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
def health(services: ServicesDep) -> JSONResponse:
    """Ready when a worker has its model loaded; 503 while starting or unhealthy."""
    report = _health(services)
    return JSONResponse(
        report.model_dump(mode="json"), status_code=200 if report.status == "healthy" else 503
    )


@router.get("/status")
def status(services: ServicesDep) -> dict[str, Any]:
    """What this deployment serves and how busy it is."""
    settings = services.settings
    stats = services.broker.stats()
    family = services.family_of(None)
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
        "workers": [w.model_dump(mode="json") for w in _live_workers(services, stats.workers)],
    }


@router.get("/metrics", response_class=Response)
def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    return Response(generate_latest(services.registry), media_type=CONTENT_TYPE_LATEST)
