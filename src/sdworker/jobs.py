"""The domain: what a job asks for (JobSpec), a job's life (Job, JobStatus, JobEvent)
and what it produces (Asset, JobResult). Plain data, no I/O, no torch."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    computed_field,
    field_validator,
    model_validator,
)

from sdworker.engine.schedulers import UnknownSchedulerError, find_scheduler
from sdworker.families import Task

SEED_MAX = 2**32 - 1
MAX_STEPS = 150
MAX_PROMPT_CHARS = 10_000
ANONYMOUS_OWNER = "anonymous"


class ResizeMode(StrEnum):
    """How an input image is fitted to the requested size."""

    CROP = "crop"  # scale to cover, then center crop (default)
    STRETCH = "stretch"  # scale to exactly the size, aspect not kept
    PAD = "pad"  # scale to fit inside, pad with black


class Priority(StrEnum):
    """Claim order: urgent first, FIFO within a priority."""

    URGENT = "urgent"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return {"urgent": 3, "high": 2, "normal": 1, "low": 0}[self.value]


class Preset(StrEnum):
    """Job types of the replaced worker, mapped to step counts."""

    SDXL_IMAGE_FAST = "sdxl_image_fast"
    SDXL_IMAGE_HIGH = "sdxl_image_high"


PRESET_STEPS: dict[Preset, int] = {Preset.SDXL_IMAGE_FAST: 15, Preset.SDXL_IMAGE_HIGH: 25}


class OutputFormat(StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX\u00d7*]\s*(\d+)\s*$")  # x, X, multiplication sign, *


class JobSpec(BaseModel):
    """The native description of one generation job, validated on construction."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False)

    task: Task | None = Field(
        default=None,
        description="text2img, img2img or inpaint; inferred from image/mask when omitted.",
    )
    model: str | None = Field(
        default=None, max_length=255, description="Model name; the default when omitted."
    )
    prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    width: int | None = Field(default=None, ge=1, description="Pixels, a multiple of 8.")
    height: int | None = Field(default=None, ge=1, description="Pixels, a multiple of 8.")
    size: str | None = Field(default=None, description='"WIDTHxHEIGHT", e.g. "1024x1024".')
    num_images: int = Field(default=1, ge=1, le=64)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance_scale: float | None = Field(default=None, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    scheduler: str | None = Field(default=None, description="See `sdworker schedulers`.")
    image: str | None = Field(
        default=None, description="Init image: path, http(s) URL, data URI or base64."
    )
    mask: str | None = Field(default=None, description="Inpaint mask (white = repaint).")
    strength: float | None = Field(default=None, ge=0, le=1, description="Denoise strength.")
    reference_strength: float | None = Field(
        default=None, ge=0, le=1, description="Legacy: strength = 1 - reference_strength."
    )
    exact_copy_mode: bool = False
    resize_mode: ResizeMode = ResizeMode.CROP
    preset: Preset | None = Field(
        default=None, description="Quality preset: its step count applies unless steps is given."
    )
    priority: Priority = Priority.NORMAL
    output_format: OutputFormat = OutputFormat.PNG
    return_base64: bool = Field(default=False, description="Also put image bytes in the result.")
    return_latents: bool = False
    webhook: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^https?://",
        description="URL that gets a signed POST when the job ends (default: settings).",
    )
    webhook_progress: bool = Field(
        default=False, description="Also POST progress events to the webhook (throttled)."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Echoed back; metadata.user_id owns the assets."
    )

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.size is not None:
            match = _SIZE_RE.match(self.size)
            if not match:
                raise ValueError(f'size must look like "1024x1024", not {self.size!r}')
            width, height = int(match[1]), int(match[2])
            if width < 1 or height < 1:
                raise ValueError(f"size {self.size!r}: width and height must be positive")
            for name, given, parsed in (
                ("width", self.width, width),
                ("height", self.height, height),
            ):
                if given is not None and given != parsed:
                    raise ValueError(f"size {self.size!r} disagrees with {name}={given}")
            self.width, self.height = width, height
        return self

    @field_validator("scheduler")
    @classmethod
    def _canonical_scheduler(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return find_scheduler(value).name
        except UnknownSchedulerError as exc:
            raise ValueError(str(exc)) from None


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each naming the field: 'steps: Input should be <= 150 (got 200)'."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] not in {"value_error", "missing"}:
            message += f" (got {error.get('input')!r})"
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class EventType(StrEnum):
    """The job events, in the order a job can meet them (SSE, webhooks, job record)."""

    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    def is_terminal(self) -> bool:
        return self in (EventType.COMPLETED, EventType.FAILED, EventType.CANCELED)


class Asset(BaseModel):
    """One stored output image and its thumbnail."""

    type: Literal["image"] = "image"
    key: str
    url: str
    thumbnail_key: str
    thumbnail_url: str
    content_type: str
    base64: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobTimings(BaseModel):
    """Seconds spent in each stage of a job."""

    queue_s: float = 0.0
    load_s: float = 0.0
    inference_s: float = 0.0
    encode_s: float = 0.0
    store_s: float = 0.0
    total_s: float = 0.0


class LatentsOutput(BaseModel):
    base64: str
    shape: list[int]
    dtype: str = "float16"


class JobResult(BaseModel):
    assets: list[Asset]
    seeds: list[int]
    model: str
    device: str
    timings: JobTimings
    vram_used_bytes: int | None = None
    warnings: list[str] = Field(default_factory=list)
    latents: LatentsOutput | None = None
    batch_jobs: int = Field(
        default=1, description="How many jobs shared the batched call that made this one's images."
    )


# What may differ between jobs run in one batched call: everything per image or per job
# outside the denoising loop. Any other field (and any field added later) must be equal.
BATCH_VARYING_FIELDS = frozenset(
    {
        "prompt",
        "negative_prompt",
        "num_images",
        "seed",
        "image",
        "mask",
        "priority",
        "output_format",
        "return_base64",
        "return_latents",
        "webhook",
        "webhook_progress",
        "metadata",
    }
)


def batch_key_of(spec: JobSpec) -> str | None:
    """Jobs with equal keys can share one batched pipeline call (same model, task, size,
    steps, scheduler, guidance, strength...); None: the job always runs alone.

    A missing negative prompt is part of the key: SDXL then uses zero embeddings, which
    cannot be mixed with text ones in one call. Inpainting jobs of several images run
    alone: diffusers encodes their one input image with the first image's generator only,
    which a batch (an input image per output image) cannot reproduce."""
    if spec.mask is not None and spec.num_images > 1:
        return None
    shared = spec.model_dump(mode="json", exclude=set(BATCH_VARYING_FIELDS))
    shared["has_negative_prompt"] = bool(spec.negative_prompt)
    shared["has_image"], shared["has_mask"] = spec.image is not None, spec.mask is not None
    canonical = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class WebhookAttempt(BaseModel):
    """The outcome of one webhook POST, kept on the job."""

    event: str
    attempt: int
    message_id: str
    at: datetime
    status_code: int | None = None
    delivered: bool = False
    retryable: bool = False
    error: str | None = None
    duration_ms: float = 0.0


class JobError(BaseModel):
    code: str
    message: str


class JobProgress(BaseModel):
    step: int = 0
    total_steps: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def percent(self) -> float:
        return round(100.0 * self.step / self.total_steps, 1) if self.total_steps else 0.0


class Job(BaseModel):
    """A job as stored and as returned by the API."""

    id: str
    status: JobStatus
    spec: JobSpec
    priority: Priority
    owner: str
    attempts: int = 0
    worker_id: str | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JobResult | None = None
    error: JobError | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    queue_position: int | None = None
    webhook_attempts: list[WebhookAttempt] = Field(default_factory=list)


class JobEvent(BaseModel):
    """One entry of a job's event log; ids grow, so a stream resumes after the last seen."""

    id: int
    job_id: str
    type: EventType
    data: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


_OWNER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def owner_of(spec: JobSpec) -> str:
    """The storage owner of a job: metadata.user_id when it is key-safe, else its hash."""
    user = spec.metadata.get("user_id")
    if user is None or user == "":
        return ANONYMOUS_OWNER
    text = str(user)
    if _OWNER_RE.match(text) and text not in {".", ".."}:
        return text
    return "u-" + hashlib.sha256(text.encode()).hexdigest()[:32]
