"""Every setting of sdworker, read from the environment (and a `.env` file).

Each field has the project's own name (`SDWORKER_<FIELD>`) and, where deployments of
the systems sdworker replaces already set one, that name too (`SDXL_MODEL_ROOT`,
`CUDA_DTYPE`, ...). When both are set, the `SDWORKER_*` name wins.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdworker.netguard import AddressPolicy

DtypeName = Literal["auto", "fp16", "bf16", "fp32"]
Switch = Literal["auto", "on", "off"]
CompileMode = Literal["auto", "off", "regional", "full"]

DEFAULT_MODEL = "tiny-sdxl"

# Where each dialect (api/dialects/) is mounted unless SDWORKER_DIALECTS says otherwise.
# "" is the root. The two that both want POST /generate (lcm, dream) and the ones with a
# /health or /status of their own get prefixes, so every default is reachable at once.
DIALECT_DEFAULT_PREFIXES: dict[str, str] = {
    "a1111": "",
    "openai": "",
    "runpod": "/runpod",
    "edge": "/edge",
    "lcm": "/lcm",
    "dream": "/dream",
    "candle": "/candle",
}
DIALECT_OFF = "off"
_PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)*$")


def _env(name: str, *aliases: str) -> AliasChoices:
    return AliasChoices(f"SDWORKER_{name}", *aliases)


_TRUE_WORDS, _FALSE_WORDS = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _fold_boolean(value: object, *, on: str) -> object:
    """Boolean spellings (true/1/yes, false/0/no) as a switch's `on` value or "off"."""
    if isinstance(value, bool):
        return on if value else "off"
    if isinstance(value, str):
        lowered = value.strip().lower()
        return on if lowered in _TRUE_WORDS else "off" if lowered in _FALSE_WORDS else lowered
    return value


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "sdworker"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "sdworker"


class Settings(BaseSettings):
    """Process-wide configuration; build one with `Settings()` in the CLI or app factory."""

    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", populate_by_name=True, validate_default=True
    )

    model_root: Path | None = Field(
        default=None,
        validation_alias=_env("MODEL_ROOT", "SDXL_MODEL_ROOT", "MODEL_ROOT"),
        description="Folder that holds model checkpoints and diffusers folders.",
    )
    model: str = Field(
        default=DEFAULT_MODEL,
        validation_alias=_env("MODEL", "SDXL_MODEL", "MODEL"),
        description=(
            "Default model: a file or folder name under model_root, a path, a Hugging Face "
            "hub id (org/name) or a built-in tiny model (tiny-sdxl)."
        ),
    )
    allowed_models: str = Field(
        default="",
        validation_alias=_env("ALLOWED_MODELS"),
        description=(
            "Comma-separated hub ids API callers may ask for (downloaded on first use); "
            "'*' allows any. Callers may always name models under the model root."
        ),
    )
    model_config_dir: Path | None = Field(
        default=None,
        validation_alias=_env("MODEL_CONFIG"),
        description=(
            "Diffusers-format config folder for single-file checkpoints whose architecture "
            "differs from the shipped one (defaults to the shipped config of the family)."
        ),
    )
    models: str | None = Field(
        default=None,
        validation_alias=_env("MODELS", "MODEL_REGISTRY"),
        description="Model registry: a TOML/YAML/JSON file, or inline JSON, mapping model "
        "names to {source, family, steps, guidance_scale, width, height, scheduler, "
        "variant, prediction_type, memory_gb}. Jobs pick one by `model`. See README "
        "'Several models'.",
    )
    model_memory_budget: str = Field(
        default="auto",
        validation_alias=_env("MODEL_MEMORY_BUDGET"),
        description="Memory the loaded models of one worker may take (e.g. 20GB, 512MB, "
        "bytes); the least recently used model is unloaded to make room. auto: 85% of the "
        "GPU's memory, or half the host's on the CPU.",
    )
    model_affinity_wait_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        validation_alias=_env("MODEL_AFFINITY_WAIT_S"),
        description="A worker prefers queued jobs for the models it has loaded, passing "
        "over the queue's head for at most this long (0: strict FIFO within a priority).",
    )
    video_model: str = Field(
        default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        validation_alias=_env("VIDEO_MODEL", "WAN_MODEL_ID"),
        description="The text-to-video model (Wan2.1) text2video jobs use when they name "
        "no model; registered when register_video_model is on.",
    )
    register_video_model: bool = Field(
        default=False,
        validation_alias=_env("REGISTER_VIDEO_MODEL", "DOWNLOAD_WAN2_MODEL"),
        description="Serve text2video with video_model (the replaced endpoint's "
        "DOWNLOAD_WAN2_MODEL). Off: text2video jobs must name a video model.",
    )
    safety_checker: bool = Field(
        default=False,
        validation_alias=_env("SAFETY_CHECKER"),
        description="Run the SD 1.x safety checker of models that ship one (flagged images "
        "come back black, with a warning). Off by default, as in the replaced systems.",
    )
    device: str = Field(
        default="auto",
        validation_alias=_env("DEVICE", "CUDA_DEVICE"),
        description="auto (cuda > mps > cpu), cpu, mps, cuda, cuda:N or a bare GPU index N.",
    )
    dtype: DtypeName = Field(
        default="auto",
        validation_alias=_env("DTYPE", "CUDA_DTYPE"),
        description="auto (fp16 on CUDA and MPS, fp32 on CPU), fp16, bf16 or fp32.",
    )
    enable_xformers: bool = Field(
        default=False,
        validation_alias=_env("ENABLE_XFORMERS", "CUDA_ENABLE_XFORMERS"),
        description="Use xformers attention when installed (PyTorch SDPA otherwise).",
    )
    attention_slicing: bool = Field(
        default=False,
        validation_alias=_env("ATTENTION_SLICING", "CUDA_ATTENTION_SLICING"),
        description="Compute attention in slices: less memory, slower.",
    )
    vae_slicing: bool = Field(
        default=False,
        validation_alias=_env("VAE_SLICING"),
        description="Decode a batch one image at a time.",
    )
    vae_tiling: bool = Field(
        default=False,
        validation_alias=_env("VAE_TILING"),
        description="Decode large images in tiles (bounded memory for very large sizes).",
    )
    video_vae_tiling: Switch = Field(
        default="auto",
        validation_alias=_env("VIDEO_VAE_TILING"),
        description="Decode videos in tiles, one at a time (bounded memory for 81 frames "
        "at 720p). auto: on for CUDA, off elsewhere.",
    )
    cpu_offload: bool = Field(
        default=False,
        validation_alias=_env("CPU_OFFLOAD"),
        description="Keep models in host memory and move each to the GPU only while it runs.",
    )
    channels_last: Switch = Field(
        default="auto",
        validation_alias=_env("CHANNELS_LAST"),
        description="Store UNet and VAE weights channels-last (faster convolutions on "
        "tensor cores). auto: on for CUDA, off elsewhere.",
    )
    fuse_qkv: Switch = Field(
        default="auto",
        validation_alias=_env("FUSE_QKV"),
        description="Fuse attention query/key/value projections into one matmul. "
        "auto: on for CUDA, off elsewhere.",
    )
    vae_dtype: DtypeName = Field(
        default="auto",
        validation_alias=_env("VAE_DTYPE"),
        description="Precision of the VAE decode. auto: the model's dtype, except that an "
        "fp16 model whose VAE overflows in fp16 (SDXL's, force_upcast) decodes in bf16 "
        "where the device has it (same range as fp32, half the cost), else fp32.",
    )
    compile: CompileMode = Field(
        default="auto",
        validation_alias=_env("COMPILE", "SDWORKER_COMPILE_UNET"),
        description="torch.compile the UNet: off; regional (its repeated transformer "
        "blocks: short compile, most of the speed); full (the whole UNet: longest compile). "
        "auto: regional on CUDA, off elsewhere. true/false mean full/off.",
    )
    compile_vae: Switch = Field(
        default="auto",
        validation_alias=_env("COMPILE_VAE"),
        description="torch.compile the VAE decoder. auto: on when the UNet is compiled.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = Field(
        default="default",
        validation_alias=_env("COMPILE_MODE"),
        description="torch.compile mode: reduce-overhead adds CUDA graphs (pays off for "
        "small images and few-step models, where kernel launches dominate).",
    )
    compile_cache_dir: Path | None = Field(
        default=None,
        validation_alias=_env("COMPILE_CACHE_DIR"),
        description="Persistent Inductor/Triton cache, so a restarted worker skips "
        "compiling (default: <cache dir>/compile; mount it on a volume).",
    )
    warmup: Switch = Field(
        default="auto",
        validation_alias=_env("WARMUP"),
        description="Run a short generation at the default size when a model loads, so "
        "compilation happens before the first job. auto: on when compiling.",
    )
    batch_max_jobs: int = Field(
        default=1,
        ge=1,
        le=64,
        validation_alias=_env("BATCH_MAX_JOBS"),
        description="Cross-job batching: a worker runs up to this many compatible queued "
        "jobs (same model, task, size, steps, scheduler, guidance) in one batched call. "
        "1 turns batching off.",
    )
    batch_max_images: int = Field(
        default=8,
        ge=1,
        le=64,
        validation_alias=_env("BATCH_MAX_IMAGES"),
        description="Most images in one cross-job batch (bounds device memory).",
    )
    batch_window_s: float = Field(
        default=0.02,
        ge=0,
        le=10,
        validation_alias=_env("BATCH_WINDOW_S"),
        description="How long a worker waits for more compatible jobs once it holds one.",
    )
    refiner: str | None = Field(
        default=None,
        validation_alias=_env("REFINER", "SDXL_REFINER_ID", "SDXL_REFINER_MODEL"),
        description="SDXL refiner: a name under model_root, a folder, a single file, a hub "
        "id or tiny-sdxl-refiner. It shares the base model's VAE and second text encoder.",
    )
    lora_dir: Path | None = Field(
        default=None,
        validation_alias=_env("LORA_DIR", "LORA_PATH"),
        description="Folder of LoRA .safetensors files (diffusers/PEFT or kohya format); "
        "default: <model_root>/loras.",
    )
    lora_cache_size: int = Field(
        default=8,
        ge=1,
        le=64,
        validation_alias=_env("LORA_CACHE_SIZE"),
        description="LoRA adapters kept loaded on the model (least recently used go first).",
    )
    lora_hotswap: Switch = Field(
        default="auto",
        validation_alias=_env("LORA_HOTSWAP"),
        description="Swap LoRAs into fixed adapter slots in place, so a compiled UNet never "
        "recompiles for a new LoRA set. auto: on when the UNet is compiled and LoRAs are "
        "configured.",
    )
    lora_hotswap_slots: int = Field(
        default=2,
        ge=1,
        le=8,
        validation_alias=_env("LORA_HOTSWAP_SLOTS"),
        description="Hotswap: most LoRAs per job (each slot costs compute on every job).",
    )
    lora_max_rank: int = Field(
        default=64,
        ge=1,
        le=1024,
        validation_alias=_env("LORA_MAX_RANK"),
        description="Hotswap: highest LoRA rank the slots hold (higher ranks are skipped).",
    )
    styles_file: Path | None = Field(
        default=None,
        validation_alias=_env("STYLES_FILE", "STYLES_CONFIG"),
        description="Style registry (TOML or YAML): style name -> LoRA, adapter name, "
        "strength levels, cross-attention dimension. See README 'Styles'.",
    )
    lcm_lora: str | None = Field(
        default=None,
        validation_alias=_env("LCM_LORA"),
        description="LCM-LoRA file (or a name in the LoRA folder) for the lcm preset.",
    )
    model_variant: Literal["auto", "standard", "turbo", "lcm"] = Field(
        default="auto",
        validation_alias=_env("MODEL_VARIANT"),
        description="turbo: adversarially distilled (1-4 steps, guidance 0); lcm: a "
        "latent-consistency model (4 steps, guidance 1). auto: from the model name.",
    )
    ip_adapter: str | None = Field(
        default=None,
        validation_alias=_env("IP_ADAPTER"),
        description="IP-Adapter weights for style/character reference images: a "
        ".safetensors/.bin file, or 'folder_or_hub_id/subfolder/weight_name'.",
    )
    ip_adapter_image_encoder: str | None = Field(
        default=None,
        validation_alias=_env("IP_ADAPTER_IMAGE_ENCODER"),
        description="CLIP vision encoder folder (or hub id) for the IP-Adapter.",
    )
    ip_adapter_scale: float = Field(
        default=0.6,
        ge=0,
        le=2,
        validation_alias=_env("IP_ADAPTER_SCALE"),
        description="Default IP-Adapter scale when a job gives no reference_scale.",
    )
    upscaler_dir: Path | None = Field(
        default=None,
        validation_alias=_env("UPSCALER_DIR"),
        description="Folder of ESRGAN-family upscaler weights (.pth/.safetensors, loaded "
        "with spandrel); default: <model_root>/upscalers.",
    )
    upscale_max_pixels: int = Field(
        default=4096 * 4096,
        ge=64 * 64,
        validation_alias=_env("UPSCALE_MAX_PIXELS"),
        description="Largest upscale output, in pixels (width x height).",
    )
    upscale_tile_size: int = Field(
        default=512,
        ge=0,
        le=8192,
        validation_alias=_env("UPSCALE_TILE_SIZE"),
        description="Upscaler models run images in tiles of this many input pixels per "
        "side (bounded memory for any size); 0 runs whole images.",
    )
    watermark: bool = Field(
        default=False,
        validation_alias=_env("WATERMARK"),
        description="Add diffusers' invisible SDXL watermark to outputs (needs the "
        "invisible-watermark package). Off by default.",
    )
    max_num_images: int = Field(
        default=8,
        ge=1,
        le=64,
        validation_alias=_env("MAX_NUM_IMAGES"),
        description="Most images one job may ask for.",
    )
    cache_dir: Path = Field(
        default_factory=_default_cache_dir,
        validation_alias=_env("CACHE_DIR"),
        description="Where built-in tiny models are built and cached.",
    )
    fetch_max_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1024,
        validation_alias=_env("FETCH_MAX_BYTES"),
        description="Largest input image (URL or base64) accepted, in bytes.",
    )
    fetch_allow: str = Field(
        default="",
        validation_alias=_env("FETCH_ALLOW"),
        description=(
            "Comma-separated hosts, addresses or CIDR networks that input URLs and webhooks "
            "may reach although not public (loopback and private networks are refused "
            "otherwise)."
        ),
    )
    fetch_timeout_s: float = Field(
        default=20.0,
        gt=0,
        validation_alias=_env("FETCH_TIMEOUT_S"),
        description="Timeout for downloading an input image URL.",
    )

    # -- the service -------------------------------------------------------------------
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        validation_alias=_env("DATA_DIR"),
        description="Where the embedded queue (jobs.db) and local assets live.",
    )
    broker: str = Field(
        default="",
        validation_alias=_env("BROKER", "REDIS_URL"),
        description=(
            "Queue backend: empty for the embedded SQLite file in data_dir, or a Redis URL "
            "(redis://[:password@]host:port/db, rediss:// for TLS)."
        ),
    )
    redis_prefix: str = Field(
        default="sdworker",
        pattern=r"^[A-Za-z0-9_.-]+$",
        validation_alias=_env("REDIS_PREFIX"),
        description="Key prefix in Redis (several deployments can share one server).",
    )
    job_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=0,
        validation_alias=_env("JOB_TTL_S"),
        description="Redis: how long a finished job's record and events are kept (0 = ever).",
    )
    s3_bucket: str = Field(
        default="",
        validation_alias=_env("S3_BUCKET", "AWS_S3_BUCKET"),
        description="Store outputs in this S3-compatible bucket (local disk when empty).",
    )
    s3_prefix: str = Field(default="", validation_alias=_env("S3_PREFIX"))
    s3_region: str | None = Field(default=None, validation_alias=_env("S3_REGION", "AWS_REGION"))
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=_env("S3_ENDPOINT_URL"),
        description="For R2, MinIO, Supabase and other S3-compatible services.",
    )
    s3_access_key_id: str | None = Field(
        default=None, validation_alias=_env("S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID")
    )
    s3_secret_access_key: SecretStr | None = Field(
        default=None, validation_alias=_env("S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY")
    )
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", validation_alias=_env("S3_ADDRESSING_STYLE")
    )
    public_assets_url: str | None = Field(
        default=None,
        validation_alias=_env("PUBLIC_ASSETS_URL", "CLOUDFRONT_URL"),
        description="CDN base URL for stored objects; presigned URLs are given otherwise.",
    )
    s3_url_expiry_s: int = Field(default=3600, ge=60, validation_alias=_env("S3_URL_EXPIRY_S"))
    webhook_url: str | None = Field(
        default=None,
        validation_alias=_env("WEBHOOK_URL"),
        description="Webhook for jobs that name none.",
    )
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=_env("WEBHOOK_SECRET"),
        description="Signing secret(s), comma-separated to rotate (whsec_<base64> or text).",
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, le=20, validation_alias=_env("WEBHOOK_MAX_ATTEMPTS")
    )
    webhook_retry_base_s: float = Field(
        default=2.0, gt=0, validation_alias=_env("WEBHOOK_RETRY_BASE_S")
    )
    webhook_progress_interval_s: float = Field(
        default=2.0, ge=0, validation_alias=_env("WEBHOOK_PROGRESS_INTERVAL_S")
    )
    host: str = Field(default="127.0.0.1", validation_alias=_env("HOST"))
    port: int = Field(default=7860, ge=1, le=65535, validation_alias=_env("PORT"))
    public_url: str | None = Field(
        default=None,
        validation_alias=_env("PUBLIC_URL"),
        description="Base URL clients reach the API at (asset URLs); http://HOST:PORT if unset.",
    )
    api_keys: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=_env("API_KEYS"),
        description="Comma-separated API keys; empty turns authentication off.",
    )
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, validation_alias=_env("MAX_BODY_BYTES")
    )
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, validation_alias=_env("HEARTBEAT_INTERVAL_S")
    )
    heartbeat_timeout_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias=_env("HEARTBEAT_TIMEOUT_S"),
        description="A running job whose worker is silent this long goes back to the queue.",
    )
    max_attempts: int = Field(default=3, ge=1, validation_alias=_env("MAX_ATTEMPTS"))
    progress_interval_s: float = Field(
        default=0.25,
        ge=0,
        validation_alias=_env("PROGRESS_INTERVAL_S"),
        description="Least time between two progress events (the last step is always sent).",
    )
    sync_timeout_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias=_env("SYNC_TIMEOUT_S"),
        description="How long POST /v1/generate waits before answering 202 with the job.",
    )
    drain_timeout_s: float = Field(
        default=120.0,
        ge=0,
        validation_alias=_env("DRAIN_TIMEOUT_S"),
        description="On shutdown, how long the running job may take before it is re-queued.",
    )
    poll_interval_s: float = Field(
        default=0.1,
        gt=0,
        validation_alias=_env("POLL_INTERVAL_S"),
        description="How often an idle worker looks for work (SQLite has no push).",
    )
    run_worker: bool = Field(
        default=True,
        validation_alias=_env("RUN_WORKER"),
        description="serve: start and supervise a worker process next to the API.",
    )
    dialects: dict[str, str] = Field(
        default_factory=dict,
        validation_alias=_env("DIALECTS"),
        description='Where the other APIs are mounted, as JSON: {"lcm": "/", "dream": "off"}; '
        '"/" is the root, "off" turns one off. Defaults: a1111 and openai at the root, '
        "runpod /runpod, edge /edge, lcm /lcm, dream /dream, candle /candle.",
    )

    @property
    def compile_cache_path(self) -> Path:
        return self.compile_cache_dir or self.cache_dir / "compile"

    @property
    def lora_path(self) -> Path | None:
        if self.lora_dir is not None:
            return self.lora_dir
        return self.model_root / "loras" if self.model_root is not None else None

    @property
    def upscaler_path(self) -> Path | None:
        if self.upscaler_dir is not None:
            return self.upscaler_dir
        return self.model_root / "upscalers" if self.model_root is not None else None

    @property
    def database_path(self) -> Path:
        return self.data_dir / "jobs.db"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def base_url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::", ""} else self.host
        return f"http://{host}:{self.port}"

    @property
    def address_policy(self) -> AddressPolicy:
        return AddressPolicy.from_list(self.fetch_allow.split(","))

    @property
    def allowed_model_list(self) -> list[str]:
        return [name.strip() for name in self.allowed_models.split(",") if name.strip()]

    @property
    def webhook_secret_list(self) -> list[str]:
        raw = self.webhook_secret.get_secret_value()
        return [secret.strip() for secret in raw.split(",") if secret.strip()]

    @property
    def api_key_list(self) -> list[str]:
        raw = self.api_keys.get_secret_value()
        return [key.strip() for key in raw.split(",") if key.strip()]

    edge_queue_url: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=_env("EDGE_QUEUE_URL", "UPSTASH_REDIS_URL"),
        description="edge dialect: redis:// or rediss:// (TLS, e.g. Upstash) URL of the Redis "
        "whose list an external producer pushes jobs to; empty: no list consumer.",
    )
    edge_queue: str = Field(
        default="sdxl_queue",
        validation_alias=_env("EDGE_QUEUE"),
        description="edge dialect: the Redis list the producer LPUSHes job payloads to.",
    )
    edge_poll_interval_s: float = Field(
        default=2.0,
        gt=0,
        validation_alias=_env("EDGE_POLL_INTERVAL_S"),
        description="edge dialect: how often the list is polled when it was empty.",
    )
    supabase_url: str | None = Field(
        default=None,
        validation_alias=_env("SUPABASE_URL", "SUPABASE_URL"),
        description="edge dialect: callbacks go to SUPABASE_URL/functions/v1/job-callback "
        "unless SDWORKER_EDGE_CALLBACK_URL is set.",
    )
    edge_callback_url: str | None = Field(
        default=None,
        validation_alias=_env("EDGE_CALLBACK_URL"),
        description="edge dialect: where job callbacks (that system's format) are POSTed.",
    )
    edge_callback_token: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=_env(
            "EDGE_CALLBACK_TOKEN", "SUPABASE_SERVICE_KEY", "SUPABASE_SERVICE_ROLE_KEY"
        ),
        description="edge dialect: sent as `Authorization: Bearer <token>` with callbacks "
        "(the edge function checks it), besides the webhook signature.",
    )
    edge_asset_urls: Literal["url", "key"] = Field(
        default="url",
        validation_alias=_env("EDGE_ASSET_URLS"),
        description="edge dialect: assets' url in callbacks: a full URL, or the storage key "
        "({user_id}/{job_id}/{i}.png, bucket-relative as the replaced worker sent).",
    )
    worker_id: str | None = Field(
        default=None,
        max_length=128,
        validation_alias=_env("WORKER_ID", "WORKER_ID"),
        description="The worker's id (serve and worker); generated when empty.",
    )
    orchestrator_url: str | None = Field(
        default=None,
        validation_alias=_env("ORCHESTRATOR_URL", "CALLBACK_URL"),
        description="candle dialect: URL the worker registers with at startup and sends "
        "heartbeats to (sd-worker-rbee's --callback-url).",
    )

    @property
    def edge_callback_target(self) -> str | None:
        """Where edge callbacks go: the explicit URL, else the Supabase job-callback."""
        if self.edge_callback_url:
            return self.edge_callback_url
        if self.supabase_url:
            return self.supabase_url.rstrip("/") + "/functions/v1/job-callback"
        return None

    @field_validator("dialects")
    @classmethod
    def _check_dialects(cls, value: dict[str, str]) -> dict[str, str]:
        checked = {}
        for name, where in value.items():
            if name not in DIALECT_DEFAULT_PREFIXES:
                known = ", ".join(DIALECT_DEFAULT_PREFIXES)
                raise ValueError(f"dialects: unknown dialect {name!r}; known: {known}")
            prefix = where.strip()
            if prefix != DIALECT_OFF:
                prefix = prefix.rstrip("/")
                if not _PREFIX_RE.match(prefix) or not where.strip().startswith("/"):
                    raise ValueError(f'dialects.{name}: {where!r} is not "/", "/a/prefix" or "off"')
            checked[name] = prefix
        return checked

    @property
    def dialect_prefixes(self) -> dict[str, str]:
        """The mounted dialects and their prefixes ("" = root), off ones left out."""
        merged = DIALECT_DEFAULT_PREFIXES | self.dialects
        return {name: prefix for name, prefix in merged.items() if prefix != DIALECT_OFF}

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "broker must be empty (SQLite) or a redis://, rediss:// or unix:// URL"
            )
        return value

    @field_validator("device")
    @classmethod
    def _normalise_device(cls, value: str) -> str:
        value = value.strip().lower()
        # CUDA_DEVICE of the replaced worker is often a bare index ("0").
        if value.isdigit():
            return f"cuda:{value}"
        valid = value in {"auto", "cpu", "mps", "cuda"} or (
            value.startswith("cuda:") and value[5:].isdigit()
        )
        if not valid:
            raise ValueError(f"device must be auto, cpu, mps, cuda, cuda:N or N, not {value!r}")
        return value

    @field_validator("compile", mode="before")
    @classmethod
    def _normalise_compile(cls, value: object) -> object:
        # SDWORKER_COMPILE_UNET=true of earlier versions meant a full compile.
        return _fold_boolean(value, on="full")

    @field_validator(
        "channels_last", "fuse_qkv", "compile_vae", "warmup", "lora_hotswap", mode="before"
    )
    @classmethod
    def _normalise_switch(cls, value: object) -> object:
        return _fold_boolean(value, on="on")

    @field_validator("dtype", "vae_dtype", mode="before")
    @classmethod
    def _normalise_dtype(cls, value: object) -> object:
        aliases = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32"}
        if isinstance(value, str):
            lowered = value.strip().lower()
            return aliases.get(lowered, lowered)
        return value
