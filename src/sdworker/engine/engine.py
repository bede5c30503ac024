"""The engine: a validated JobSpec in, images (and optionally latents) out."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from sdworker.engine.adapters import Adapters, LoraAdapters
from sdworker.engine.arguments import batch_arguments, check_batchable, pipeline_arguments
from sdworker.engine.hotswap import HotswapLoras
from sdworker.engine.inputs import prepare_inputs
from sdworker.engine.models import (
    ModelSource,
    estimate_weight_bytes,
    load_pipeline,
    pipeline_options,
    resolve_model,
)
from sdworker.engine.pipelines import PipelineSet
from sdworker.engine.progress import (
    CancelCheck,
    CancelRequested,
    Progress,
    StepCallback,
    refiner_step_count,
)
from sdworker.engine.prompts import PlainPrompts, PromptEncoder
from sdworker.engine.reference import IpAdapter, ip_adapter_scale
from sdworker.engine.refiner import load_refiner
from sdworker.engine.registry import LoadedModels, default_budget, module_bytes
from sdworker.engine.runtime import (
    SpeedOptions,
    apply_pipeline_options,
    apply_refiner_options,
    dtype_name,
    resolve_speed_options,
    select_device,
    select_dtype,
    set_vae_dtype,
)
from sdworker.engine.schedulers import build_scheduler, find_scheduler
from sdworker.engine.upscale import UpscalerModels, lanczos
from sdworker.errors import InvalidJobError, OutOfMemoryError
from sdworker.families import Task, served_profile
from sdworker.jobs import JobSpec
from sdworker.loras import LoraLibrary, ResolvedLora
from sdworker.model_registry import default_model_for, load_model_registry, parse_memory_size
from sdworker.options import RefinerMode
from sdworker.planning import (
    Features,
    GenerationPlan,
    features_from_settings,
    plan_generation,
)
from sdworker.settings import Settings
from sdworker.upscalers import upscaler_path


@dataclass(frozen=True)
class Latents:
    """Final denoised latents (before the VAE), raw NCHW bytes."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str = "float16"


@dataclass
class EngineResult:
    images: list[Image.Image]  # for a video: its first frame (the poster)
    seeds: list[int]
    plan: GenerationPlan
    model: str
    family: str
    device: str
    dtype: str
    latents: Latents | None
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    batch_jobs: int = 1  # jobs that shared the pipeline call
    videos: list[list[Image.Image]] | None = None  # text2video: the frames of each video


@dataclass(frozen=True)
class Cancelled:
    """The job was cancelled; `step` denoising steps of `total_steps` had run."""

    step: int
    total_steps: int


@dataclass
class LoadedModel:
    source: ModelSource
    pipelines: PipelineSet
    scheduler_config: Any
    speed: SpeedOptions
    load_s: float  # weights on the device, compiled and warmed up: ready for jobs
    warnings: list[str]
    adapters: Adapters
    prompts: PromptEncoder | PlainPrompts
    warmup_s: float = 0.0
    refiner: Any = None  # the refiner pipeline, loaded with the first job that needs it
    refiner_scheduler_config: Any = None
    refiner_prompts: PromptEncoder | None = None


@dataclass
class _Output:
    """What the pipeline calls of a job made, and what really applied."""

    images: list[Image.Image]
    warnings: list[str] = field(default_factory=list)
    loras: tuple[ResolvedLora, ...] = ()
    videos: list[list[Image.Image]] | None = None


class Engine:
    """Runs one job at a time on one device (diffusers pipelines are not thread-safe)."""

    def __init__(self, settings: Settings, *, allow_local_paths: bool = True) -> None:
        """allow_local_paths: input images may be files on this machine (CLI, library);
        workers serving callers turn it off."""
        self._settings = settings
        self._allow_local_paths = allow_local_paths
        self._device = select_device(settings.device)
        self._dtype = select_dtype(settings.dtype, self._device)
        self._sources: dict[str, ModelSource] = {}
        self._registry = load_model_registry(settings)
        budget = parse_memory_size(settings.model_memory_budget)
        self._models: LoadedModels[ModelSource, LoadedModel] = LoadedModels(
            self._load_model,
            lambda loaded: module_bytes(loaded.pipelines.base, loaded.refiner),
            budget_bytes=budget if budget is not None else default_budget(self._device),
            estimate=lambda source: estimate_weight_bytes(
                source, settings, torch.finfo(self._dtype).bits // 8
            ),
            on_unload=self._unloaded,
            name_of=lambda source: source.name,
        )
        self._lock = threading.Lock()
        self._library = LoraLibrary.from_settings(settings, allow_paths=allow_local_paths)
        self._ip_adapter = IpAdapter(settings, self._device, self._dtype)
        self._upscalers = UpscalerModels(self._device, tile=settings.upscale_tile_size)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def models(self) -> LoadedModels[ModelSource, LoadedModel]:
        """The loaded models (least recently used first) and the memory budget."""
        return self._models

    def source(self, model: str | None = None) -> ModelSource:
        """Find (once) the model a job names, or the default model."""
        name = model or self._settings.model
        if name not in self._sources:
            # The operator's default model may be any path; a job's own choice only may
            # when this engine trusts its callers with local paths (CLI, library).
            trusted = name == self._settings.model or self._allow_local_paths
            self._sources[name] = resolve_model(
                name, self._settings, trusted=trusted, registry=self._registry
            )
        return self._sources[name]

    def source_of(self, spec: JobSpec) -> ModelSource:
        """The model a job runs on (its own, the video model, or the default)."""
        return self.source(default_model_for(spec, self._settings))

    def features(self, model: str | None = None) -> Features:
        """What this engine offers a model beyond plain generation (from settings)."""
        source = self.source(model)
        return features_from_settings(
            self._settings, source.name, self._library, family=source.family, config=source.config
        )

    def plan(self, spec: JobSpec) -> GenerationPlan:
        """Validate a spec against its model's family without loading weights."""
        source = self.source_of(spec)
        profile = served_profile(source.family, source.name)
        return plan_generation(
            spec,
            profile,
            max_num_images=self._settings.max_num_images,
            features=self.features(source.name),
        )

    def load(self, model: str | None = None) -> LoadedModel:
        """Load a model (or return it if loaded), unloading the least recently used
        ones when the memory budget would be passed."""
        source = self.source(model)
        with self._lock:
            return self._models.get(source)[0]

    def loaded_models(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        return [source.name for source in self._models.keys()]  # noqa: SIM118 (a method)

    def refiner_loaded(self) -> bool:
        """Whether a loaded model holds its refiner (loaded with the first job using it)."""
        return any(loaded.refiner is not None for loaded in self._models.values())

    def _unloaded(self, source: ModelSource, loaded: LoadedModel) -> None:
        self._ip_adapter.forget_if(loaded.pipelines.base)
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_model(self, source: ModelSource) -> LoadedModel:
        started = time.perf_counter()
        base = load_pipeline(source, self._settings, self._dtype)
        speed = resolve_speed_options(
            self._settings,
            self._device,
            self._dtype,
            vae_force_upcast=bool(getattr(base.vae.config, "force_upcast", False)),
            adapters=self._adapters_possible(),
        )
        adapters = self._lora_manager(base, speed, source.family)  # slots before compiling
        warnings = apply_pipeline_options(
            base, self._settings, self._device, speed, family=source.family
        )
        offload = self._settings.cpu_offload and self._device.type == "cuda"
        device = self._device

        def on_derive(pipe: Any) -> None:
            # from_pipe casts every shared module to the pipeline dtype: the VAE too.
            if speed.vae_dtype is not None:
                set_vae_dtype(pipe.vae, speed.vae_dtype)

        def on_switch(pipe: Any) -> None:
            if offload:
                pipe.enable_model_cpu_offload(device=device)

        loaded = LoadedModel(
            source=source,
            pipelines=PipelineSet(
                base,
                source.family,
                on_switch if offload else None,
                on_derive,
                options=pipeline_options(self._settings, source.family),
            ),
            scheduler_config=base.scheduler.config,
            speed=speed,
            load_s=0.0,
            warnings=warnings,
            adapters=adapters,
            prompts=PromptEncoder(base)
            if source.family == "sdxl"
            else PlainPrompts(base, source.family),
        )
        if speed.warmup:
            loaded.warmup_s = self._warm_up(loaded)
        loaded.load_s = time.perf_counter() - started
        return loaded

    def _loras_configured(self) -> bool:
        s = self._settings
        return bool(
            (s.lora_path is not None and s.lora_path.is_dir()) or s.styles_file or s.lcm_lora
        )

    def _lora_manager(self, base: Any, speed: SpeedOptions, family: str) -> Adapters:
        s = self._settings
        auto = speed.compile != "off" and self._loras_configured()
        hotswap = s.lora_hotswap == "on" or (s.lora_hotswap == "auto" and auto)
        if hotswap and family == "sdxl":
            return HotswapLoras(
                base,
                slots=s.lora_hotswap_slots,
                max_rank=s.lora_max_rank,
                cache_size=s.lora_cache_size,
            )
        return LoraAdapters(base, cache_size=s.lora_cache_size)

    def _adapters_possible(self) -> bool:
        return self._loras_configured() or bool(self._settings.ip_adapter)

    def _refiner_of(self, loaded: LoadedModel) -> Any:
        if loaded.refiner is None:
            refiner = load_refiner(self._settings, loaded.pipelines.base, self._dtype)
            loaded.warnings += apply_refiner_options(
                refiner, self._settings, self._device, loaded.speed
            )
            if loaded.speed.vae_dtype is not None:
                set_vae_dtype(refiner.vae, loaded.speed.vae_dtype)
            loaded.refiner_scheduler_config = refiner.scheduler.config
            loaded.refiner_prompts = PromptEncoder(refiner)
            loaded.refiner = refiner
        return loaded.refiner

    def _warm_up(self, loaded: LoadedModel) -> float:
        """One short text-to-image run at the family's default size, so that compiling
        (lazy in torch.compile) happens at load time and not in the first job."""
        started = time.perf_counter()
        profile = served_profile(loaded.source.family, loaded.source.name)
        # Two images as well: a second batch size makes torch.compile treat the batch
        # dimension as dynamic, so later batches (and cross-job batches) do not recompile.
        for images in (1, 2) if loaded.source.family != "wan-t2v" else (1,):
            spec = JobSpec(prompt="warm-up", steps=2, seed=0, num_images=images)
            plan = plan_generation(spec, profile, max_num_images=images)
            self._generate(loaded.source, loaded, [plan], [{}], None, None, 0.0)
        return time.perf_counter() - started

    def run(
        self,
        spec: JobSpec,
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> EngineResult | Cancelled:
        """Generate a job's images, reporting (step, total) after every denoising step and
        stopping before the next step once `is_cancelled()` is true."""
        outcome = self.run_batch([spec], on_step, is_cancelled)
        return outcome if isinstance(outcome, Cancelled) else outcome[0]

    def run_batch(
        self,
        specs: list[JobSpec],
        on_step: StepCallback | None = None,
        is_cancelled: CancelCheck | None = None,
    ) -> list[EngineResult] | Cancelled:
        """Several compatible jobs (equal jobs.batch_key_of) in one batched pipeline call,
        one result per spec. Every image keeps its own seed's generator, so a job's images
        equal those it gets when run alone (up to batched-kernel rounding)."""
        if not specs:
            raise ValueError("run_batch needs at least one spec")
        plans = [self.plan(spec) for spec in specs]
        sources = {self.source_of(spec) for spec in specs}
        if len(sources) > 1:
            raise InvalidJobError("jobs of one batch must use the same model", field="model")
        check_batchable(plans)
        inputs = [
            prepare_inputs(plan, self._settings, allow_paths=self._allow_local_paths)
            for plan in plans
        ]
        source = sources.pop()
        with self._lock:
            loaded, load_s = None, 0.0
            if _needs_model(plans[0]):
                loaded, fresh = self._models.get(source)
                load_s = loaded.load_s if fresh else 0.0
            try:
                return self._generate(source, loaded, plans, inputs, on_step, is_cancelled, load_s)
            except torch.OutOfMemoryError as exc:
                gc.collect()
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(_out_of_memory_message(plans, inputs)) from exc

    def _generate(
        self,
        source: ModelSource,
        loaded: LoadedModel | None,
        plans: list[GenerationPlan],
        inputs: list[dict[str, Image.Image]],
        on_step: StepCallback | None,
        is_cancelled: CancelCheck | None,
        load_s: float,
    ) -> list[EngineResult] | Cancelled:
        first = plans[0]
        if len(plans) > 1 and loaded is not None and not self._equal_prompt_lengths(loaded, plans):
            return self._one_by_one(source, loaded, plans, inputs, on_step, is_cancelled, load_s)
        progress = Progress(on_step, is_cancelled)
        started = time.perf_counter()
        try:
            if first.task is Task.UPSCALE:
                output = self._upscale(loaded, first, inputs[0], progress)
            else:
                assert loaded is not None
                output = self._denoise(loaded, plans, inputs, progress)
        except CancelRequested as cancel:
            return Cancelled(step=cancel.step, total_steps=cancel.total)
        inference_s = time.perf_counter() - started
        all_latents = None
        if any(plan.return_latents for plan in plans) and progress.latents is not None:
            all_latents = progress.latents.detach().to("cpu", torch.float16).contiguous()
        results = []
        offset = 0
        for plan in plans:
            end = offset + plan.num_images
            latents = None
            if plan.return_latents and all_latents is not None:
                tensor = all_latents[offset:end].contiguous()
                latents = Latents(data=tensor.numpy().tobytes(), shape=tuple(tensor.shape))
            results.append(
                EngineResult(
                    images=list(output.images[offset:end]),
                    seeds=list(plan.seeds),
                    # the LoRAs that really applied (others were skipped with a warning)
                    plan=replace(plan, loras=output.loras),
                    model=source.name,
                    family=source.family,
                    device=str(self._device),
                    dtype=dtype_name(self._dtype),
                    latents=latents,
                    timings={"load_s": load_s, "inference_s": inference_s},
                    warnings=[
                        *(loaded.warnings if loaded else []),
                        *plan.warnings,
                        *output.warnings,
                    ],
                    batch_jobs=len(plans),
                    videos=list(output.videos[offset:end]) if output.videos else None,
                )
            )
            offset = end
        return results

    @staticmethod
    def _equal_prompt_lengths(loaded: LoadedModel, plans: list[GenerationPlan]) -> bool:
        """Long prompts are padded to the batch's longest, which would change the images
        of shorter ones: such jobs run one by one instead."""
        lengths = {
            loaded.prompts.sequence_length(
                {"prompt": plan.prompt, "negative_prompt": plan.negative_prompt},
                weighting=plan.prompt_weighting,
            )
            for plan in plans
        }
        return len(lengths) == 1

    def _one_by_one(
        self,
        source: ModelSource,
        loaded: LoadedModel,
        plans: list[GenerationPlan],
        inputs: list[dict[str, Image.Image]],
        on_step: StepCallback | None,
        is_cancelled: CancelCheck | None,
        load_s: float,
    ) -> list[EngineResult] | Cancelled:
        results: list[EngineResult] = []
        done = 0
        for index, (plan, images) in enumerate(zip(plans, inputs, strict=True)):
            # Progress counts on over the jobs of the batch, as one batched call would.
            later = sum(p.denoise_steps for p in plans[index + 1 :])
            last = [plan.denoise_steps]

            def report(
                step: int, total: int, done: int = done, later: int = later, last: list[int] = last
            ) -> None:
                last[0] = total
                if on_step is not None:
                    on_step(done + step, done + total + later)

            outcome = self._generate(source, loaded, [plan], [images], report, is_cancelled, load_s)
            if isinstance(outcome, Cancelled):
                return Cancelled(done + outcome.step, done + outcome.total_steps + later)
            results.extend(outcome)
            done += last[0]
        return results

    def _denoise(
        self,
        loaded: LoadedModel,
        plans: list[GenerationPlan],
        inputs: list[dict[str, Image.Image]],
        progress: Progress,
    ) -> _Output:
        """The diffusion call(s) of a plan (or batch): base model, then the refiner."""
        first = plans[0]
        activation = loaded.adapters.activate(first.loras)
        warnings, applied = list(activation.warnings), tuple(activation.applied)
        self._ip_adapter.sync(loaded.pipelines.base, first.reference is not None)
        pipe = loaded.pipelines.for_task(first.task)
        seeds = [seed for plan in plans for seed in plan.seeds]
        pipe.scheduler = build_scheduler(
            find_scheduler(first.scheduler), loaded.scheduler_config, seeds
        )
        if len(plans) == 1:
            arguments = pipeline_arguments(first) | inputs[0]
        else:
            arguments = batch_arguments(plans, inputs)
        if first.reference is not None:
            scale = first.reference.scale
            scale = self._settings.ip_adapter_scale if scale is None else scale
            pipe.set_ip_adapter_scale(ip_adapter_scale(pipe.unet, first.reference.type, scale))
        texts = {name: arguments[name] for name in ("prompt", "negative_prompt")}
        encoded, notes = loaded.prompts.encode(texts, weighting=first.prompt_weighting)
        warnings += notes
        refiner = first.refiner
        if refiner is None:
            result = progress.call(pipe, arguments | encoded, later=0)
            if first.video is not None:
                # Wan makes 4k + 1 frames; the job gets exactly the frames it asked for.
                videos = [list(frames[: first.video.num_frames]) for frames in result.frames]
                return _Output([v[0] for v in videos], warnings, applied, videos=videos)
            return _Output(result.images, warnings + _safety_notes(result), applied)
        refiner_pipe = self._refiner_of(loaded)
        assert loaded.refiner_prompts is not None
        refiner_pipe.scheduler = build_scheduler(
            find_scheduler(first.scheduler), loaded.refiner_scheduler_config, seeds
        )
        base_arguments = arguments | encoded | {"output_type": "latent"}
        shared = {
            name: arguments[name]
            for name in ("guidance_scale", "num_images_per_prompt", "generator")
        }
        refined, notes = loaded.refiner_prompts.encode(texts, weighting=first.prompt_weighting)
        warnings += [note for note in notes if note not in warnings]
        later = refiner_step_count(refiner_pipe.scheduler, refiner)
        if refiner.mode is RefinerMode.ENSEMBLE:
            base_arguments["denoising_end"] = refiner.high_noise_frac
            extra: dict[str, Any] = {"denoising_start": refiner.high_noise_frac}
        else:
            extra = {"strength": refiner.strength}
        latents = progress.call(pipe, base_arguments, later=later).images
        refiner_arguments = (
            shared
            | texts
            | refined
            | extra
            | {
                "image": latents,
                "num_inference_steps": refiner.steps,
            }
        )
        images = progress.call(refiner_pipe, refiner_arguments, later=0).images
        return _Output(images, warnings, applied)

    def _upscale(
        self,
        loaded: LoadedModel | None,
        plan: GenerationPlan,
        inputs: dict[str, Image.Image],
        progress: Progress,
    ) -> _Output:
        assert plan.upscale is not None
        image, factor, name = inputs["image"], plan.upscale.factor, plan.upscale.upscaler
        if name == "lanczos":
            return _Output([lanczos(image, factor)])
        if name == "hires":
            # Resample, then a low-strength img2img pass at the new size adds real detail.
            big = lanczos(image, factor)
            width, height = big.width // 8 * 8, big.height // 8 * 8
            if big.size != (width, height):
                big = big.resize((width, height), Image.Resampling.LANCZOS)
            img2img = replace(plan, task=Task.IMG2IMG, width=width, height=height, upscale=None)
            assert loaded is not None
            return self._denoise(loaded, [img2img], [{"image": big}], progress)
        path = upscaler_path(self._settings.upscaler_path, name)
        if path is None:
            raise InvalidJobError(f"upscaler: {name!r} is no longer available", field="upscaler")
        return _Output([self._upscalers.upscale(path, image, factor)])


def _safety_notes(result: Any) -> list[str]:
    """SD 1.x's safety checker (SDWORKER_SAFETY_CHECKER) blacks out flagged images."""
    flags = getattr(result, "nsfw_content_detected", None) or []
    return [
        f"image {index} was flagged by the safety checker and replaced by a black image"
        for index, flagged in enumerate(flags)
        if flagged
    ]


def _needs_model(plan: GenerationPlan) -> bool:
    """Resampling and upscaler models need no diffusion model loaded."""
    return plan.upscale is None or plan.upscale.upscaler == "hires"


def _out_of_memory_message(
    plans: list[GenerationPlan], inputs: list[dict[str, Image.Image]]
) -> str:
    first = plans[0]
    if first.upscale is not None and "image" in inputs[0]:
        width, height = inputs[0]["image"].size
        factor = first.upscale.factor
        return (
            f"out of device memory upscaling {width}x{height} x{factor} to "
            f"{width * factor}x{height * factor}; try a smaller image or factor, or a smaller "
            "SDWORKER_UPSCALE_TILE_SIZE"
        )
    images = sum(plan.num_images for plan in plans)
    return (
        f"out of device memory for {images} image(s) at {first.width}x{first.height}; "
        "try fewer images or a smaller size"
    )
