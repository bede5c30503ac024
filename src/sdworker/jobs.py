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

from sdworker.engine.schedulers import canonical_scheduler
from sdworker.families import Task
from sdworker.options import (
    MAX_LORAS_PER_JOB,
    UPSCALE_FACTORS,
    LoraRequest,
    Preset,
    ReferenceType,
    RefinerMode,
    StyleRequest,
)

SEED_MAX = 2**32 - 1
# The video endpoint this replaces (Wan2.1 text-to-video): its sizes and ranges.
VIDEO_HEIGHTS = (480, 720)
VIDEO_WIDTHS = (832, 1280)
MIN_FRAMES, MAX_FRAMES, DEFAULT_FRAMES = 16, 81, 81
MIN_FPS, MAX_FPS, DEFAULT_FPS = 6, 30, 15
VIDEO_FIELDS = ("num_frames", "fps", "video_height", "video_width", "video_guidance_scale")
MAX_STEPS = 150
DEFAULT_OUTPUT_QUALITY = 95
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


class WebhookFormat(StrEnum):
    """The body a job's webhook gets: sdworker's own, or a replaced system's."""

    NATIVE = "native"
    EDGE = "edge"  # the edge-function worker's job-callback (api/dialects/edge.py)


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
        description="text2img, img2img, inpaint, upscale or text2video; inferred from "
        "image/mask (and video fields) when omitted.",
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
        default=None,
        description="Named defaults (see /status presets): sdxl_image_fast, sdxl_image_high "
        "(refiner), lcm (LCM-LoRA, 4 steps), turbo (1 step, guidance 0). Fields given win.",
    )
    high_quality: bool = Field(
        default=False, description="Run the refiner (ensemble mode unless `refiner` says)."
    )
    refiner: RefinerMode | None = Field(
        default=None,
        description="off, ensemble (base stops at high_noise_frac, refiner finishes) or "
        "refine (img2img over the base image with refiner_strength).",
    )
    high_noise_frac: float | None = Field(
        default=None, gt=0, lt=1, description="Ensemble: share of the denoising the base does."
    )
    refiner_inference_steps: int | None = Field(
        default=None, ge=1, le=MAX_STEPS, description="Refiner steps (default: steps)."
    )
    refiner_strength: float | None = Field(
        default=None, gt=0, le=1, description="Refine mode: img2img strength (default 0.3)."
    )
    loras: list[LoraRequest] = Field(
        default_factory=list,
        max_length=MAX_LORAS_PER_JOB,
        description="LoRAs by name (GET /v1/loras) with weights; several at once.",
    )
    style: StyleRequest | None = Field(
        default=None, description="A style of the style registry at a level (0 = off)."
    )
    prompt_weighting: bool = Field(
        default=False,
        description="Parse (word:1.3), word++, word--, .blend() and .and() in prompts.",
    )
    compel_enabled: bool | None = Field(
        default=None, description="Alias of prompt_weighting (the replaced worker's name)."
    )
    compel_weights: str | None = Field(
        default=None,
        max_length=MAX_PROMPT_CHARS,
        description='Weighted terms appended to the prompt, e.g. "(detailed:1.2)"; turns '
        "prompt weighting on.",
    )
    reference_type: ReferenceType | None = Field(
        default=None,
        description="How `image` steers a job: composition (img2img start, the default), "
        "style or character (IP-Adapter, text-to-image).",
    )
    reference_scale: float | None = Field(
        default=None, ge=0, le=2, description="IP-Adapter scale for style/character."
    )
    upscale_factor: int | None = Field(
        default=None, description=f"Upscale task: {' or '.join(map(str, UPSCALE_FACTORS))}."
    )
    upscaler: str | None = Field(
        default=None,
        max_length=255,
        description="Upscale task: lanczos (default), hires (resample, then img2img at "
        "strength, default 0.35) or a model name from GET /v1/upscalers.",
    )
    num_frames: int | None = Field(
        default=None,
        ge=MIN_FRAMES,
        le=MAX_FRAMES,
        description=f"text2video: frames of the video (default {DEFAULT_FRAMES}).",
    )
    fps: int | None = Field(
        default=None,
        ge=MIN_FPS,
        le=MAX_FPS,
        description=f"text2video: frames per second of the MP4 (default {DEFAULT_FPS}).",
    )
    video_height: int | None = Field(
        default=None,
        description=f"text2video: {' or '.join(map(str, VIDEO_HEIGHTS))} (sets height).",
    )
    video_width: int | None = Field(
        default=None,
        description=f"text2video: {' or '.join(map(str, VIDEO_WIDTHS))} (sets width).",
    )
    video_guidance_scale: float | None = Field(
        default=None, ge=0, le=30, description="text2video: guidance scale (default 5.0)."
    )
    priority: Priority = Priority.NORMAL
    output_format: OutputFormat = OutputFormat.PNG
    output_quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description=f"JPEG/WEBP quality (default {DEFAULT_OUTPUT_QUALITY}); PNG is lossless.",
    )
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
    webhook_format: WebhookFormat = Field(
        default=WebhookFormat.NATIVE,
        description="native, or edge: the edge-function worker's callback body (set by that "
        "dialect).",
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
        self._apply_video_size()
        return self

    def _apply_video_size(self) -> None:
        for name, video_name, allowed in (
            ("height", "video_height", VIDEO_HEIGHTS),
            ("width", "video_width", VIDEO_WIDTHS),
        ):
            value = getattr(self, video_name)
            if value is None:
                continue
            if value not in allowed:
                raise ValueError(
                    f"{video_name} must be {' or '.join(map(str, allowed))}, not {value}"
                )
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"{video_name}={value} disagrees with {name}={given}")
            setattr(self, name, value)

    @property
    def has_video_fields(self) -> bool:
        """Any field that only a text-to-video job takes."""
        return any(getattr(self, name) is not None for name in VIDEO_FIELDS)

    @field_validator("upscale_factor")
    @classmethod
    def _check_factor(cls, value: int | None) -> int | None:
        if value is not None and value not in UPSCALE_FACTORS:
            allowed = " or ".join(map(str, UPSCALE_FACTORS))
            raise ValueError(f"must be {allowed}, not {value}")
        return value

    @property
    def weighting_enabled(self) -> bool:
        """Prompt weighting on, by its own name or the replaced worker's compel fields."""
        return self.prompt_weighting or bool(self.compel_enabled) or bool(self.compel_weights)

    @property
    def full_prompt(self) -> str:
        """The prompt with compel_weights appended (the replaced worker's convention)."""
        extra = (self.compel_weights or "").strip()
        return f"{self.prompt}, {extra}" if extra and self.prompt else extra or self.prompt

    @field_validator("scheduler")
    @classmethod
    def _canonical_scheduler(cls, value: str | None) -> str | None:
        return canonical_scheduler(value)


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

    type: Literal["image", "video"] = "image"
    key: str
    url: str
    thumbnail_key: str
    thumbnail_url: str
    content_type: str
    base64: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class VideoInfo(BaseModel):
    """What a text-to-video job's MP4 holds."""

    frames: int
    width: int
    height: int
    fps: int
    duration_seconds: float


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
    video_info: VideoInfo | None = Field(
        default=None, description="text2video: frames, size, fps and duration of the MP4."
    )
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
        "output_quality",
        "return_base64",
        "return_latents",
        "webhook",
        "webhook_progress",
        "webhook_format",
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
    if spec.reference_type in (ReferenceType.STYLE, ReferenceType.CHARACTER):
        return None  # one reference image per call
    if spec.task is Task.UPSCALE or spec.upscale_factor or spec.upscaler:
        return None
    if spec.task is Task.TEXT2VIDEO or spec.has_video_fields:
        return None  # one video per call
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
