"""RunPod worker input -> JobSpec fields, and a Job -> RunPod output, status and health.

Pure translation (no FastAPI, no torch), shared by the HTTP dialect (api/dialects/
runpod.py) and the serverless handler (sdworker/runpod_handler.py), so both speak the
same input and give the same output for the same job.

The input is the SDXL + Wan worker's: prompt, task_type, image_url/mask_url, sizes,
steps, scheduler, num_images, the refiner ensemble, the video fields, use_cloud_storage,
user_id and file_uid. Unknown input fields are refused, naming them, as RunPod's
rp_validator does (a misspelt field would otherwise be dropped without a word).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from sdworker.broker.base import BrokerStats, WorkerInfo
from sdworker.errors import InvalidJobError
from sdworker.jobs import Job, JobStatus, describe_validation_error
from sdworker.media import data_uri

# JobSpec field -> this protocol's name, for error messages.
NAMES = {
    "task": "task_type",
    "image": "image_url",
    "mask": "mask_url",
    "steps": "num_inference_steps",
}

STATUS = {
    JobStatus.QUEUED: "IN_QUEUE",
    JobStatus.RUNNING: "IN_PROGRESS",
    JobStatus.SUCCEEDED: "COMPLETED",
    JobStatus.FAILED: "FAILED",
    JobStatus.CANCELED: "CANCELLED",
}

# metadata keys the job keeps: the owner, the caller's id echoed back, and how to answer.
CLOUD_KEY = "use_cloud_storage"
# Input names that are another name of one JobSpec field: (name, alias, field).
ALIASES = (("num_inference_steps", "steps", "steps"), ("num_images", "num_outputs", "num_images"))
SAME_NAME = (
    "prompt",
    "negative_prompt",
    "strength",
    "width",
    "height",
    "guidance_scale",
    "seed",
    "scheduler",
    "num_frames",
    "fps",
    "video_height",
    "video_width",
    "video_guidance_scale",
)


class RunpodInput(BaseModel):
    """The worker's `input`; ranges and allowed values are JobSpec's (named in its words)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str | None = None
    task_type: Literal["text2img", "img2img", "inpaint", "text2video"] | None = None
    image_url: str | None = None
    mask_url: str | None = None
    strength: float | None = None
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    scheduler: str | None = None
    num_images: int | None = None
    num_outputs: int | None = None
    refiner_inference_steps: int | None = None
    high_noise_frac: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    video_height: int | None = None
    video_width: int | None = None
    video_guidance_scale: float | None = None
    use_cloud_storage: bool = False
    user_id: str | int | None = None
    file_uid: str | int | None = None


INPUT_FIELDS = tuple(RunpodInput.model_fields)


def parse_input(raw: object) -> RunpodInput:
    """The input, checked for unknown fields and types; InvalidJobError names the field."""
    if not isinstance(raw, Mapping):
        raise InvalidJobError("input must be a JSON object of generation fields", field="input")
    unknown = [str(name) for name in raw if name not in RunpodInput.model_fields]
    if unknown:
        verb = "is not a valid input option" if len(unknown) == 1 else "are not valid input options"
        raise InvalidJobError(
            f"Unexpected input. {', '.join(unknown)} {verb}; valid: {', '.join(INPUT_FIELDS)}",
            field=unknown[0],
        )
    try:
        return RunpodInput.model_validate(dict(raw))
    except ValidationError as exc:
        errors = exc.errors()
        field = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise InvalidJobError(describe_validation_error(exc), field=field) from None


def _one_of(data: RunpodInput, name: str, alias: str) -> Any:
    """A field given under either of its names; both, and different, is an error."""
    first, second = getattr(data, name), getattr(data, alias)
    if first is not None and second is not None and first != second:
        raise InvalidJobError(
            f"{name}={first} and {alias}={second} disagree: give one", field=alias
        )
    return first if first is not None else second


def spec_fields(data: RunpodInput, *, refiner_available: bool) -> dict[str, Any]:
    """JobSpec fields for the input. The refiner fields ask for the SDXL refiner
    ensemble where the deployment has a refiner; without one they are checked and kept
    on the job but change nothing, as the replaced worker's clients send them routinely."""
    fields: dict[str, Any] = {name: getattr(data, name) for name in SAME_NAME}
    for name, alias, field in ALIASES:
        fields[field] = _one_of(data, name, alias)
    fields |= {"task": data.task_type, "image": data.image_url, "mask": data.mask_url}
    fields["high_noise_frac"] = data.high_noise_frac
    fields["refiner_inference_steps"] = data.refiner_inference_steps
    wants_refiner = data.refiner_inference_steps is not None or data.high_noise_frac is not None
    if wants_refiner and refiner_available and data.task_type != "text2video":
        fields["refiner"] = "ensemble"
    metadata: dict[str, Any] = {CLOUD_KEY: data.use_cloud_storage}
    if data.user_id is not None:
        metadata["user_id"] = str(data.user_id)
    if data.file_uid is not None:
        metadata["file_uid"] = data.file_uid
    fields["metadata"] = metadata
    return {name: value for name, value in fields.items() if value is not None}


def wants_urls(job: Job) -> bool:
    """The job asked for stored asset URLs (use_cloud_storage) rather than data URIs."""
    return job.spec.metadata.get(CLOUD_KEY) is True


def job_output(job: Job, payloads: Sequence[bytes] | None) -> dict[str, Any]:
    """A succeeded job's output: its media as data URIs (payloads: each asset's bytes)
    or, with payloads None, as the stored assets' URLs."""
    result = job.result
    if result is None or not result.assets:  # never for a stored job; kept safe anyway
        return {"error": f"job {job.id} succeeded without any output"}
    assets = result.assets
    if payloads is None:
        media = [asset.url for asset in assets]
    else:
        media = [data_uri(a.content_type, data) for a, data in zip(assets, payloads, strict=True)]
    output: dict[str, Any]
    if result.video_info is not None:
        output = {
            "video_url": media[0],
            "videos": media,
            "video_info": result.video_info.model_dump(),
            "seed": result.seeds[0],
        }
    else:
        output = {"image_url": media[0], "images": media, "seed": result.seeds[0]}
        output["seeds"] = result.seeds
    if "file_uid" in job.spec.metadata:
        output["file_uid"] = job.spec.metadata["file_uid"]
    if result.warnings:
        output["warnings"] = result.warnings
    return output


def error_of(job: Job) -> str:
    """Why a job did not complete, in one line."""
    if job.error is not None:
        return job.error.message
    return f"job {job.id} was cancelled" if job.status is JobStatus.CANCELED else job.status.value


def _ms(start: datetime | None, end: datetime | None) -> int:
    if start is None:
        return 0
    return max(0, round(((end or datetime.now(UTC)) - start).total_seconds() * 1000))


def status_body(job: Job, output: dict[str, Any] | None = None) -> dict[str, Any]:
    """RunPod's job status: id, status, delayTime (ms queued), executionTime (ms
    running); output when COMPLETED, error when FAILED."""
    queued_until = job.started_at or job.finished_at
    body: dict[str, Any] = {
        "id": job.id,
        "status": STATUS[job.status],
        "delayTime": _ms(job.created_at, queued_until),
        "executionTime": _ms(job.started_at, job.finished_at),
    }
    if job.status is JobStatus.SUCCEEDED and output is not None:
        body["output"] = output
    elif job.status is JobStatus.FAILED:
        body["error"] = error_of(job)
    return body


def health_body(stats: BrokerStats, live_workers: Sequence[WorkerInfo]) -> dict[str, Any]:
    """RunPod's endpoint health from the queue's counts and the live workers."""
    running = sum(1 for worker in live_workers if worker.jobs_held())
    return {
        "jobs": {
            "completed": stats.finished.get(JobStatus.SUCCEEDED.value, 0),
            "failed": stats.finished.get(JobStatus.FAILED.value, 0),
            "inProgress": stats.running,
            "inQueue": sum(stats.queued.values()),
            "retried": 0,  # re-queued jobs are not counted apart
        },
        "workers": {"idle": len(live_workers) - running, "running": running},
    }
