"""Webhook bodies: sdworker's own (`payload_for`) and the edge-function worker's
job-callback (`edge_payload_for`, for jobs whose spec.webhook_format is edge)."""

from __future__ import annotations

from typing import Any

from sdworker.jobs import Asset, EventType, Job, JobStatus
from sdworker.settings import Settings

# The edge system's job statuses (its job-callback also knows 'queued'/'processing').
EDGE_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.RUNNING: "processing",
    JobStatus.SUCCEEDED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELED: "failed",
}
MIB = 1024 * 1024


def payload_for(job: Job, event: EventType) -> dict[str, Any]:
    """What a receiver gets: the job's outcome, assets and job metadata."""
    result = job.result
    assets = [
        {
            "type": asset.type,
            "url": asset.url,
            "thumbnail_url": asset.thumbnail_url,
            "metadata": asset.metadata,
        }
        for asset in (result.assets if result else [])
    ]
    return {
        "type": f"job.{event.value}",
        "job_id": job.id,
        "worker_id": job.worker_id,
        "status": job.status.value,
        "progress": job.progress.model_dump(),
        "assets": assets,
        "error": job.error.model_dump() if job.error else None,
        "metadata": {
            "processing_time": result.timings.total_s if result else None,
            "timings": result.timings.model_dump() if result else None,
            "batch_size": job.spec.num_images,
            "vram_used": result.vram_used_bytes if result else None,
            "seeds": result.seeds if result else [],
            "model": result.model if result else job.spec.model,
            "caller": job.metadata,
        },
    }


def edge_payload_for(job: Job, settings: Settings) -> dict[str, Any]:
    """The job-callback body of the edge-function worker: `job_id` is the edge system's
    own id (kept in metadata.edge by the edge dialect), assets carry that worker's
    per-image metadata, and a canceled job reads as failed (that system has no
    'canceled')."""
    edge = job.spec.metadata.get("edge") or {}
    result = job.result if job.status is JobStatus.SUCCEEDED else None
    assets = [_edge_asset(asset, settings) for asset in (result.assets if result else [])]
    return {
        "job_id": str(edge.get("job_id") or job.id),
        "worker_id": job.worker_id,
        "status": EDGE_STATUS[job.status],
        "assets": assets,
        "error_message": _edge_error(job, edge.get("fields") or {}),
        "metadata": _edge_metadata(job, edge.get("type"), len(assets)),
    }


def edge_rejection_payload(
    edge_job_id: str, job_type: str | None, message: str, worker_id: str | None
) -> dict[str, Any]:
    """The failed callback for an edge payload that never became a job (it did not
    parse or failed validation)."""
    return {
        "job_id": edge_job_id,
        "worker_id": worker_id,
        "status": "failed",
        "assets": [],
        "error_message": message,
        "metadata": {"error_type": "invalid_request", "job_type": job_type},
    }


def _edge_error(job: Job, names: dict[str, str]) -> str | None:
    """The failure in one line; a leading JobSpec field ("image: ...") in the payload's
    words (names: field -> payload path, kept by the edge dialect)."""
    if job.status is JobStatus.CANCELED:
        return "canceled"
    if job.status is not JobStatus.FAILED:
        return None
    message = job.error.message if job.error else "failed"
    head, sep, rest = message.partition(": ")
    return f"{names[head]}{sep}{rest}" if sep and head in names else message


def _edge_metadata(job: Job, job_type: Any, num_assets: int) -> dict[str, Any]:
    spec, result = job.spec, job.result
    timings = result.timings if result else None
    vram = result.vram_used_bytes if result else None
    reference = "none" if spec.image is None else (spec.reference_type or "composition")
    metadata: dict[str, Any] = {
        "enhancement_source": "none",  # prompts are used as given (no LLM enhancement)
        "compel_enhancement": spec.weighting_enabled,
        "compel_enabled": spec.weighting_enabled,
        "compel_weights": spec.compel_weights or None,
        "reference_mode": str(reference),
        "processing_time": timings.total_s if timings else None,
        "vram_used": round(vram / MIB) if vram else None,  # MiB, as that worker reported
        "batch_size": spec.num_images,
        "exact_copy_mode": spec.exact_copy_mode,
        "seed": result.seeds[0] if result and result.seeds else spec.seed,
        "generation_time": timings.inference_s if timings else None,
        "num_images": num_assets or spec.num_images,
        "job_type": job_type or (spec.preset.value if spec.preset else None),
        "sdworker_job_id": job.id,
    }
    if job.error is not None:
        metadata["error_type"] = job.error.code
    return metadata


def _edge_asset(asset: Asset, settings: Settings) -> dict[str, Any]:
    """One image as that worker described it; url is the full URL, or the storage key
    (bucket-relative, as the original sent) with SDWORKER_EDGE_ASSET_URLS=key."""
    meta = asset.metadata
    by_key = settings.edge_asset_urls == "key"
    described: dict[str, Any] = {
        name: meta.get(name)
        for name in ("width", "height", "format", "batch_size", "steps", "guidance_scale", "seed")
    }
    described |= {
        "file_size_bytes": meta.get("file_size_bytes"),
        "asset_index": meta.get("asset_index"),
        "negative_prompt_used": bool(meta.get("negative_prompt_used")),
    }
    if meta.get("pipeline") == "img2img":
        resize = meta.get("resize_policy")
        described |= {
            "denoise_strength": meta.get("denoise_strength"),
            "pipeline": "img2img",
            "resize_policy": "center_crop" if resize == "crop" else resize,
        }
    return {
        "type": asset.type,
        "url": asset.key if by_key else asset.url,
        "thumbnail_url": asset.thumbnail_key if by_key else asset.thumbnail_url,
        "metadata": described,
    }
