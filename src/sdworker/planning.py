"""Resolving a JobSpec against a model family into a concrete generation plan."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field, replace
from enum import StrEnum

from sdworker.errors import InvalidJobError
from sdworker.families import (
    FamilyProfile,
    Option,
    Task,
    families_for,
    families_with,
)
from sdworker.jobs import (
    DEFAULT_FPS,
    DEFAULT_FRAMES,
    SEED_MAX,
    VIDEO_FIELDS,
    JobSpec,
    ResizeMode,
)
from sdworker.loras import LoraCatalog, LoraLibrary, ResolvedLora
from sdworker.model_registry import ModelConfig
from sdworker.options import (
    DEFAULT_HIGH_NOISE_FRAC,
    DEFAULT_HIRES_STRENGTH,
    DEFAULT_REFINE_STRENGTH,
    PRESETS,
    Preset,
    PresetDefaults,
    ReferenceType,
    RefinerMode,
)
from sdworker.prompt_syntax import check_weighting_syntax
from sdworker.settings import Settings
from sdworker.upscalers import upscaler_names

# Exact-copy mode of the replaced worker: a near-identity img2img pass.
EXACT_COPY_MAX_STRENGTH = 0.05
EXACT_COPY_MIN_STRENGTH = 0.01
EXACT_COPY_STEPS = (6, 10)
DEFAULT_IMG2IMG_STRENGTH = 0.75
DEFAULT_INPAINT_STRENGTH = 1.0


class GenerationMode(StrEnum):
    TEXT2IMG = "text2img"
    REFERENCE_MODIFY = "reference_modify"
    EXACT_COPY = "exact_copy"
    INPAINT = "inpaint"
    UPSCALE = "upscale"
    TEXT2VIDEO = "text2video"


UPSCALE_RESAMPLERS = ("lanczos", "hires")
HIRES_MIN_SIDE = 16  # the img2img pass works in latents of 1/8 the size


@dataclass(frozen=True)
class Features:
    """What the deployment offers beyond the base model (from settings): LoRAs and
    styles, a refiner, an IP-Adapter, upscaler models, the model's few-step variant."""

    library: LoraLibrary = field(default_factory=lambda: LoraLibrary(LoraCatalog(None)))
    refiner: bool = False
    ip_adapter: bool = False
    variant: str = "standard"  # standard, turbo or lcm
    upscalers: tuple[str, ...] = ()
    upscale_max_pixels: int = 4096 * 4096
    # The model's own defaults from the model registry (SDWORKER_MODELS): they beat the
    # family's and a few-step variant's, a preset the job names beats them.
    model_defaults: PresetDefaults = field(default_factory=lambda: PresetDefaults(""))
    default_size: tuple[int, int] | None = None


def detect_variant(setting: str, model: str) -> str:
    """standard, turbo or lcm: the setting, or (auto) from the model's name."""
    if setting != "auto":
        return setting
    lowered = model.lower()
    return "turbo" if "turbo" in lowered else "lcm" if "lcm" in lowered else "standard"


def features_from_settings(
    settings: Settings,
    model: str,
    library: LoraLibrary,
    *,
    family: str = "sdxl",
    config: ModelConfig | None = None,
) -> Features:
    """The Features a model of this deployment offers (`config`: its model registry
    entry, whose defaults and variant win over the deployment-wide settings)."""
    sdxl = family == "sdxl"  # the refiner and IP-Adapter settings are SDXL models
    variant = detect_variant(settings.model_variant, config.source if config else model)
    if config is not None:
        variant = config.variant or detect_variant("auto", f"{model} {config.source}")
    defaults = PresetDefaults("")
    size = None
    if config is not None:
        defaults = PresetDefaults(
            "model registry",
            steps=config.steps,
            guidance_scale=config.guidance_scale,
            scheduler=config.scheduler,
        )
        if config.width or config.height:
            size = (config.width or 0, config.height or 0)
    return Features(
        library=library,
        refiner=sdxl and bool(settings.refiner),
        ip_adapter=sdxl and bool(settings.ip_adapter and settings.ip_adapter_image_encoder),
        variant=variant,
        upscalers=upscaler_names(settings.upscaler_path),
        upscale_max_pixels=settings.upscale_max_pixels,
        model_defaults=defaults,
        default_size=size,
    )


@dataclass(frozen=True)
class RefinerPlan:
    mode: RefinerMode
    high_noise_frac: float
    steps: int
    strength: float


@dataclass(frozen=True)
class ReferencePlan:
    """An IP-Adapter reference image (style or character)."""

    type: ReferenceType
    image: str
    scale: float | None  # None: the deployment's default scale


@dataclass(frozen=True)
class UpscalePlan:
    factor: int
    upscaler: str  # lanczos, hires or an upscaler model name
    max_side: int  # hires denoises at the output size: the family's largest side


@dataclass(frozen=True)
class VideoPlan:
    """A text-to-video job: the frames asked for, and the frames the model makes (Wan's
    VAE packs 4 frames per latent: 4k + 1 frames, the extra ones are dropped)."""

    num_frames: int
    fps: int
    generated_frames: int


def generated_frame_count(frames: int, temporal_factor: int = 4) -> int:
    """The smallest k * factor + 1 >= frames: what a Wan model can make."""
    return -(-(frames - 1) // temporal_factor) * temporal_factor + 1


@dataclass(frozen=True)
class GenerationPlan:
    """A JobSpec resolved against a model family: every value concrete, ready to run."""

    task: Task
    mode: GenerationMode
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_images: int
    seeds: list[int]
    num_inference_steps: int  # handed to diffusers (img2img runs int(n * strength) of them)
    denoise_steps: int  # steps that actually run
    guidance_scale: float
    scheduler: str
    strength: float | None
    image: str | None
    mask: str | None
    resize_mode: ResizeMode
    return_latents: bool
    warnings: list[str] = field(default_factory=list)
    prompt_weighting: bool = False
    loras: tuple[ResolvedLora, ...] = ()
    refiner: RefinerPlan | None = None
    reference: ReferencePlan | None = None
    upscale: UpscalePlan | None = None
    preset: Preset | None = None
    video: VideoPlan | None = None


def _invalid(field_name: str, message: str) -> InvalidJobError:
    return InvalidJobError(f"{field_name}: {message}", field=field_name)


def _uses_ip_adapter(spec: JobSpec) -> bool:
    return spec.reference_type in (ReferenceType.STYLE, ReferenceType.CHARACTER)


def _infer_task(spec: JobSpec, family: FamilyProfile) -> Task:
    if spec.has_video_fields or family.tasks == {Task.TEXT2VIDEO}:
        return Task.TEXT2VIDEO
    if spec.upscale_factor is not None or spec.upscaler is not None:
        return Task.UPSCALE
    if spec.mask:
        return Task.INPAINT
    image_is_init = spec.image and not _uses_ip_adapter(spec)
    return Task.IMG2IMG if image_is_init else Task.TEXT2IMG


def _resolve_task(spec: JobSpec, family: FamilyProfile) -> Task:
    task = spec.task or _infer_task(spec, family)
    if task not in family.tasks:
        allowed = ", ".join(sorted(t.value for t in family.tasks))
        raise _invalid(
            "task",
            f"{task.value} is not supported by {family.name} models (this model does "
            f"{allowed}); families that can: {', '.join(families_for(task))} — name such a "
            "model in `model` (GET /status lists them)",
        )
    _check_video_fields(spec, task)
    if task in (Task.IMG2IMG, Task.INPAINT, Task.UPSCALE) and not spec.image:
        raise _invalid("image", f"{task.value} needs an input image")
    if task is Task.INPAINT and not spec.mask:
        raise _invalid("mask", "inpaint needs a mask image (white = repaint)")
    if task is Task.UPSCALE and spec.mask:
        raise _invalid("mask", "upscale takes no mask")
    if task is not Task.UPSCALE and (spec.upscale_factor or spec.upscaler):
        where = "upscale_factor" if spec.upscale_factor else "upscaler"
        raise _invalid(where, f"applies to task upscale, not {task.value}")
    if _uses_ip_adapter(spec):
        if task is not Task.TEXT2IMG:
            raise _invalid(
                "reference_type",
                f"{spec.reference_type} references steer text2img jobs; use composition "
                f"(or no reference_type) for {task.value}",
            )
        if not spec.image:
            raise _invalid("image", f"reference_type {spec.reference_type} needs an image")
    elif task is Task.TEXT2IMG and (spec.image or spec.mask):
        raise _invalid("task", "text2img takes no image or mask; use img2img or inpaint")
    if spec.exact_copy_mode and task is not Task.IMG2IMG:
        raise _invalid("exact_copy_mode", "applies to img2img only")
    return task


def _resolve_scheduler(spec: JobSpec, family: FamilyProfile, defaults: PresetDefaults) -> str:
    preferred = defaults.scheduler
    if preferred and not family.allows_scheduler(preferred):
        preferred = None  # a preset's sampler for UNet models; flow models keep their own
    scheduler = spec.scheduler or preferred or family.default_scheduler
    if not family.allows_scheduler(scheduler):
        allowed = ", ".join(family.schedulers or ("any but flow_match_euler",))
        raise _invalid(
            "scheduler", f"{scheduler} does not fit {family.name} models; allowed: {allowed}"
        )
    return scheduler


def _check_video_fields(spec: JobSpec, task: Task) -> None:
    if task is not Task.TEXT2VIDEO and spec.has_video_fields:
        given = next(name for name in VIDEO_FIELDS if getattr(spec, name) is not None)
        raise _invalid(given, f"applies to task text2video, not {task.value}")
    if task is Task.TEXT2VIDEO and (spec.image or spec.mask):
        raise _invalid("image" if spec.image else "mask", "text2video takes no image or mask")


def _resolve_size(spec: JobSpec, family: FamilyProfile, features: Features) -> tuple[int, int]:
    own = features.default_size or (0, 0)
    width = spec.width if spec.width is not None else own[0] or family.default_size[0]
    height = spec.height if spec.height is not None else own[1] or family.default_size[1]
    multiple = family.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value % multiple or not family.min_side <= value <= family.max_side:
            raise _invalid(
                name,
                f"{value} is not allowed for {family.name}: use a multiple of {multiple} from "
                f"{family.min_side} to {family.max_side}",
            )
    return width, height


def _check_options(spec: JobSpec, family: FamilyProfile) -> None:
    """A 422 for a generation feature the model's architecture does not have."""
    asked = {
        Option.LORAS: ("loras" if spec.loras else "style", bool(spec.loras or spec.style)),
        Option.PROMPT_WEIGHTING: (
            "compel_weights" if spec.compel_weights else "prompt_weighting",
            spec.weighting_enabled,
        ),
        Option.REFINER: (
            "refiner" if spec.refiner else "high_quality",
            spec.high_quality or spec.refiner not in (None, RefinerMode.OFF),
        ),
        Option.REFERENCE: ("reference_type", _uses_ip_adapter(spec)),
        Option.LCM: ("preset", spec.preset is Preset.LCM),
    }
    for option, (name, used) in asked.items():
        if used and option not in family.options:
            raise _invalid(
                name,
                f"{family.name} models do not support {option.value}; families that do: "
                f"{', '.join(families_with(option))}",
            )


def _resolve_video(
    spec: JobSpec, task: Task, guidance: float, warnings: list[str]
) -> tuple[VideoPlan | None, float]:
    if task is not Task.TEXT2VIDEO:
        return None, guidance
    if spec.video_guidance_scale is not None:
        if spec.guidance_scale is not None and spec.guidance_scale != spec.video_guidance_scale:
            warnings.append(
                "both guidance_scale and video_guidance_scale given; the video one was used"
            )
        guidance = spec.video_guidance_scale
    frames = spec.num_frames or DEFAULT_FRAMES
    plan = VideoPlan(frames, spec.fps or DEFAULT_FPS, generated_frame_count(frames))
    return plan, guidance


def _exact_copy_steps(strength: float) -> tuple[int, int]:
    """(denoise steps 6..10 growing with strength, scheduler steps that yield exactly them)."""
    low, high = EXACT_COPY_STEPS
    span = EXACT_COPY_MAX_STRENGTH - EXACT_COPY_MIN_STRENGTH
    denoise = low + round((high - low) * (strength - EXACT_COPY_MIN_STRENGTH) / span)
    total = math.ceil(denoise / strength)
    while int(total * strength) < denoise:  # diffusers runs int(n * strength) steps
        total += 1
    return denoise, total


def _preset_of(spec: JobSpec, features: Features) -> tuple[Preset | None, PresetDefaults]:
    """The preset that applies and the defaults in force: a preset the job names, then
    the model registry's defaults, then a few-step variant's own preset."""
    own = features.model_defaults
    if spec.preset is not None:
        return spec.preset, _merged(PRESETS[spec.preset], own)
    if features.variant in ("turbo", "lcm"):
        preset = Preset(features.variant)
        return preset, _merged(own, PRESETS[preset])
    return None, own


def _merged(first: PresetDefaults, second: PresetDefaults) -> PresetDefaults:
    """first's values, second's where first has none."""
    return replace(
        first,
        steps=first.steps or second.steps,
        guidance_scale=first.guidance_scale
        if first.guidance_scale is not None
        else second.guidance_scale,
        scheduler=first.scheduler or second.scheduler,
        refiner=first.refiner or second.refiner,
        lcm_lora=first.lcm_lora or second.lcm_lora,
    )


def _resolve_refiner(
    spec: JobSpec, task: Task, steps: int, defaults: PresetDefaults, features: Features
) -> RefinerPlan | None:
    asked = spec.refiner or (RefinerMode.ENSEMBLE if spec.high_quality else None)
    # A preset's refiner would repaint outside an inpaint mask, and upscales take none.
    preset_refiner = features.refiner and task in (Task.TEXT2IMG, Task.IMG2IMG)
    mode = asked or (defaults.refiner if preset_refiner else None)
    if mode is None or mode is RefinerMode.OFF:
        return None
    if not features.refiner:
        where = "refiner" if spec.refiner else "high_quality"
        raise _invalid(
            where,
            "no refiner is configured on this server; set SDWORKER_REFINER (or "
            "SDXL_REFINER_ID) to a refiner model",
        )
    if task is Task.UPSCALE:
        raise _invalid("refiner", "upscale jobs take no refiner")
    if mode is RefinerMode.ENSEMBLE and task is not Task.TEXT2IMG:
        mode = RefinerMode.REFINE  # the base's partial latents exist only for text2img
    plan = RefinerPlan(
        mode=mode,
        high_noise_frac=spec.high_noise_frac or DEFAULT_HIGH_NOISE_FRAC,
        steps=spec.refiner_inference_steps or steps,
        strength=spec.refiner_strength or DEFAULT_REFINE_STRENGTH,
    )
    if mode is RefinerMode.REFINE and int(plan.steps * plan.strength) < 1:
        raise _invalid(
            "refiner_strength",
            f"refiner steps {plan.steps} x refiner_strength {plan.strength:g} runs no refiner "
            f"step; raise refiner_inference_steps to at least {math.ceil(1 / plan.strength)} "
            "or refiner_strength",
        )
    return plan


def _resolve_reference(spec: JobSpec, features: Features) -> ReferencePlan | None:
    if not _uses_ip_adapter(spec):
        return None
    assert spec.reference_type is not None and spec.image is not None
    if not features.ip_adapter:
        raise _invalid(
            "reference_type",
            f"{spec.reference_type} references need an IP-Adapter; set SDWORKER_IP_ADAPTER "
            "and SDWORKER_IP_ADAPTER_IMAGE_ENCODER (or use reference_type composition)",
        )
    return ReferencePlan(type=spec.reference_type, image=spec.image, scale=spec.reference_scale)


def _resolve_upscale(spec: JobSpec, family: FamilyProfile, features: Features) -> UpscalePlan:
    upscaler = spec.upscaler or "lanczos"
    if upscaler not in UPSCALE_RESAMPLERS and upscaler not in features.upscalers:
        known = ", ".join([*UPSCALE_RESAMPLERS, *features.upscalers])
        raise _invalid("upscaler", f"unknown upscaler {upscaler!r}; known: {known}")
    return UpscalePlan(factor=spec.upscale_factor or 2, upscaler=upscaler, max_side=family.max_side)


def check_upscale_size(plan: GenerationPlan, width: int, height: int, max_pixels: int) -> None:
    """Refuse an upscale whose output would pass the pixel cap, or (hires, which
    denoises at the output size) the model's largest side; names the field."""
    assert plan.upscale is not None
    factor, max_side = plan.upscale.factor, plan.upscale.max_side
    out_w, out_h = width * factor, height * factor
    if plan.upscale.upscaler == "hires" and max(out_w, out_h) > max_side:
        raise _invalid(
            "upscale_factor",
            f"hires upscaling of {width}x{height} x{factor} gives {out_w}x{out_h}, over the "
            f"model's largest side of {max_side} px; use lanczos or an upscaler model",
        )
    if plan.upscale.upscaler == "hires" and min(out_w, out_h) < HIRES_MIN_SIDE:
        raise _invalid(
            "image",
            f"hires upscaling of {width}x{height} x{factor} gives {out_w}x{out_h}; it needs "
            f"at least {HIRES_MIN_SIDE} px per side (use lanczos for tiny images)",
        )
    if out_w * out_h > max_pixels:
        raise _invalid(
            "upscale_factor",
            f"{width}x{height} x{factor} = {out_w}x{out_h} is over the limit of {max_pixels} "
            "pixels (SDWORKER_UPSCALE_MAX_PIXELS); use a smaller factor or image",
        )


def _resolve_strength(spec: JobSpec, task: Task, warnings: list[str]) -> float | None:
    if task in (Task.TEXT2IMG, Task.TEXT2VIDEO):
        return None
    strength = spec.strength
    if strength is None and spec.reference_strength is not None:
        strength = 1.0 - spec.reference_strength
    elif strength is not None and spec.reference_strength is not None:
        warnings.append("both strength and reference_strength given; strength was used")
    if strength is None:
        strength = {
            Task.INPAINT: DEFAULT_INPAINT_STRENGTH,
            Task.UPSCALE: DEFAULT_HIRES_STRENGTH,
        }.get(task, DEFAULT_IMG2IMG_STRENGTH)
    return strength


def _check_prompts(spec: JobSpec) -> None:
    if spec.weighting_enabled:
        for name in ("prompt", "negative_prompt", "compel_weights"):
            check_weighting_syntax(getattr(spec, name) or "", name)
        if spec.compel_weights:  # what is encoded: the prompt with the weights appended
            check_weighting_syntax(spec.full_prompt, "compel_weights")


def plan_generation(
    spec: JobSpec,
    family: FamilyProfile,
    *,
    max_num_images: int,
    features: Features | None = None,
) -> GenerationPlan:
    """Resolve defaults, img2img modes and family bounds; raise InvalidJobError on misuse."""
    features = features or Features()
    task = _resolve_task(spec, family)
    _check_options(spec, family)
    _check_prompts(spec)
    width, height = _resolve_size(spec, family, features)
    if spec.num_images > max_num_images:
        raise _invalid("num_images", f"{spec.num_images} is over the limit of {max_num_images}")
    seed = spec.seed if spec.seed is not None else secrets.randbelow(SEED_MAX + 1)
    # Image i uses seed + i (wrapped so every returned seed is a valid input seed).
    seeds = [(seed + i) % (SEED_MAX + 1) for i in range(spec.num_images)]
    warnings: list[str] = []
    preset, defaults = _preset_of(spec, features)
    steps = spec.steps or defaults.steps or family.default_steps
    guidance = next(
        g
        for g in (spec.guidance_scale, defaults.guidance_scale, family.default_guidance)
        if g is not None
    )
    video, guidance = _resolve_video(spec, task, guidance, warnings)
    scheduler = _resolve_scheduler(spec, family, defaults)
    negative = spec.negative_prompt
    strength = _resolve_strength(spec, task, warnings)
    if spec.steps is None and preset in (Preset.LCM, Preset.TURBO) and strength:
        # A few-step model's steps are denoising steps: img2img runs int(steps x strength).
        wanted = steps
        while int(steps * strength) < wanted:
            steps += 1
    mode = {
        Task.TEXT2IMG: GenerationMode.TEXT2IMG,
        Task.IMG2IMG: GenerationMode.REFERENCE_MODIFY,
        Task.UPSCALE: GenerationMode.UPSCALE,
        Task.TEXT2VIDEO: GenerationMode.TEXT2VIDEO,
    }.get(task, GenerationMode.INPAINT)
    upscale = _resolve_upscale(spec, family, features) if task is Task.UPSCALE else None
    if upscale is not None and upscale.upscaler != "hires" and spec.num_images > 1:
        raise _invalid("num_images", f"{upscale.upscaler} upscaling makes one image; use 1")
    if upscale is not None and upscale.upscaler != "hires":
        strength = None  # a plain resample or an upscaler model: no denoising

    denoise_steps = steps
    if spec.exact_copy_mode:
        mode = GenerationMode.EXACT_COPY
        assert strength is not None
        strength = min(max(strength, EXACT_COPY_MIN_STRENGTH), EXACT_COPY_MAX_STRENGTH)
        denoise_steps, steps = _exact_copy_steps(strength)
        guidance = 1.0
        if negative:
            warnings.append("exact_copy_mode ignores negative_prompt")
        negative = None
    elif strength is not None:
        denoise_steps = min(int(steps * strength), steps)
        if denoise_steps < 1:
            raise _invalid(
                "strength",
                f"steps={steps} x strength={strength:g} runs no denoising step; raise steps "
                f"to at least {math.ceil(1 / strength) if strength else 'any'} or strength",
            )
    elif upscale is not None:
        denoise_steps = 0
    lcm_lora = defaults.lcm_lora and features.variant != "lcm"
    loras = features.library.resolve(spec.loras, spec.style, lcm=lcm_lora)

    return GenerationPlan(
        task=task,
        mode=mode,
        prompt=spec.full_prompt,
        negative_prompt=negative or None,
        width=width,
        height=height,
        num_images=spec.num_images,
        seeds=seeds,
        num_inference_steps=steps,
        denoise_steps=denoise_steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        strength=strength,
        image=spec.image,
        mask=spec.mask,
        resize_mode=spec.resize_mode,
        return_latents=spec.return_latents,
        warnings=warnings,
        prompt_weighting=spec.weighting_enabled,
        loras=tuple(loras),
        refiner=_resolve_refiner(spec, task, steps, defaults, features),
        reference=_resolve_reference(spec, features),
        upscale=upscale,
        preset=preset,
        video=video,
    )
