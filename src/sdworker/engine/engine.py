"""The engine: a validated JobSpec in, images (and optionally latents) out."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from PIL import Image

from sdworker.engine.models import ModelSource, load_pipeline, resolve_model
from sdworker.engine.pipelines import PipelineSet
from sdworker.engine.runtime import (
    SpeedOptions,
    apply_pipeline_options,
    dtype_name,
    resolve_speed_options,
    select_device,
    select_dtype,
    set_vae_dtype,
)
from sdworker.engine.schedulers import build_scheduler, find_scheduler
from sdworker.errors import InvalidJobError, OutOfMemoryError
from sdworker.families import Task, served_profile
from sdworker.fetch import load_image, require_same_size
from sdworker.jobs import JobSpec
from sdworker.media import fit_to_size
from sdworker.planning import GenerationPlan, plan_generation
from sdworker.settings import Settings

StepCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]


@dataclass(frozen=True)
class Latents:
    """Final denoised latents (before the VAE), raw NCHW bytes."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str = "float16"


@dataclass
class EngineResult:
    images: list[Image.Image]
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
    warmup_s: float = 0.0


class _CancelRequested(Exception):
    def __init__(self, step: int, total: int) -> None:
        super().__init__(step, total)
        self.step, self.total = step, total


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
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def source(self, model: str | None = None) -> ModelSource:
        """Find (once) the model a job names, or the default model."""
        name = model or self._settings.model
        if name not in self._sources:
            # The operator's default model may be any path; a job's own choice only may
            # when this engine trusts its callers with local paths (CLI, library).
            trusted = name == self._settings.model or self._allow_local_paths
            self._sources[name] = resolve_model(name, self._settings, trusted=trusted)
        return self._sources[name]

    def plan(self, spec: JobSpec) -> GenerationPlan:
        """Validate a spec against its model's family without loading weights."""
        source = self.source(spec.model)
        profile = served_profile(source.family, source.name)
        return plan_generation(spec, profile, max_num_images=self._settings.max_num_images)

    def load(self, model: str | None = None) -> LoadedModel:
        """Load a model (or return it if loaded); a different model replaces the current."""
        source = self.source(model)
        with self._lock:
            return self._load_locked(source)

    def _load_locked(self, source: ModelSource) -> LoadedModel:
        if self._loaded is not None and self._loaded.source == source:
            return self._loaded
        self._unload_locked()
        started = time.perf_counter()
        base = load_pipeline(source, self._settings, self._dtype)
        speed = resolve_speed_options(
            self._settings,
            self._device,
            self._dtype,
            vae_force_upcast=bool(getattr(base.vae.config, "force_upcast", False)),
        )
        warnings = apply_pipeline_options(base, self._settings, self._device, speed)
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
            pipelines=PipelineSet(base, on_switch if offload else None, on_derive),
            scheduler_config=base.scheduler.config,
            speed=speed,
            load_s=0.0,
            warnings=warnings,
        )
        if speed.warmup:
            loaded.warmup_s = self._warm_up(loaded)
        loaded.load_s = time.perf_counter() - started
        self._loaded = loaded
        return loaded

    def _warm_up(self, loaded: LoadedModel) -> float:
        """One short text-to-image run at the family's default size, so that compiling
        (lazy in torch.compile) happens at load time and not in the first job."""
        started = time.perf_counter()
        profile = served_profile(loaded.source.family, loaded.source.name)
        # Two images as well: a second batch size makes torch.compile treat the batch
        # dimension as dynamic, so later batches (and cross-job batches) do not recompile.
        for images in (1, 2):
            spec = JobSpec(prompt="warm-up", steps=2, seed=0, num_images=images)
            plan = plan_generation(spec, profile, max_num_images=images)
            self._generate(loaded, [plan], [{}], None, None, 0.0)
        return time.perf_counter() - started

    def _unload_locked(self) -> None:
        self._loaded = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

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
        sources = {self.source(spec.model) for spec in specs}
        if len(sources) > 1:
            raise InvalidJobError("jobs of one batch must use the same model", field="model")
        check_batchable(plans)
        inputs = [self._prepare_inputs(plan) for plan in plans]
        source = sources.pop()
        with self._lock:
            already_loaded = self._loaded is not None and self._loaded.source == source
            loaded = self._load_locked(source)
            load_s = 0.0 if already_loaded else loaded.load_s
            try:
                return self._generate(loaded, plans, inputs, on_step, is_cancelled, load_s)
            except torch.OutOfMemoryError as exc:
                gc.collect()
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                images = sum(plan.num_images for plan in plans)
                raise OutOfMemoryError(
                    f"out of device memory for {images} image(s) at "
                    f"{plans[0].width}x{plans[0].height}; try fewer images or a smaller size"
                ) from exc

    def _prepare_inputs(self, plan: GenerationPlan) -> dict[str, Image.Image]:
        if plan.task is Task.TEXT2IMG or plan.image is None:
            return {}
        fetch = partial(
            load_image,
            max_bytes=self._settings.fetch_max_bytes,
            timeout_s=self._settings.fetch_timeout_s,
            policy=self._settings.address_policy,
            allow_paths=self._allow_local_paths,
        )
        image = fetch(plan.image, field="image")
        inputs = {
            "image": fit_to_size(image.convert("RGB"), plan.width, plan.height, plan.resize_mode)
        }
        if plan.task is Task.INPAINT and plan.mask is not None:
            mask = fetch(plan.mask, field="mask")
            require_same_size(image, mask)
            inputs["mask_image"] = fit_to_size(
                mask.convert("L"), plan.width, plan.height, plan.resize_mode
            )
        return inputs

    def _generate(
        self,
        loaded: LoadedModel,
        plans: list[GenerationPlan],
        inputs: list[dict[str, Image.Image]],
        on_step: StepCallback | None,
        is_cancelled: CancelCheck | None,
        load_s: float,
    ) -> list[EngineResult] | Cancelled:
        first = plans[0]
        pipe = loaded.pipelines.for_task(first.task)
        seeds = [seed for plan in plans for seed in plan.seeds]
        pipe.scheduler = build_scheduler(
            find_scheduler(first.scheduler), loaded.scheduler_config, seeds
        )
        final: dict[str, torch.Tensor] = {}

        def step_end(pipeline: Any, index: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            final["latents"] = kwargs["latents"]
            total = int(pipeline.num_timesteps)
            if on_step is not None:
                on_step(index + 1, total)
            if is_cancelled is not None and is_cancelled() and index + 1 < total:
                # Raised rather than diffusers' `interrupt` flag, which still runs the
                # VAE decode over the partial latents: cancel should free the device now.
                raise _CancelRequested(index + 1, total)
            return kwargs

        if len(plans) == 1:
            arguments = pipeline_arguments(first) | inputs[0]
        else:
            arguments = batch_arguments(plans, inputs)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = pipe(**arguments, callback_on_step_end=step_end, output_type="pil")
        except _CancelRequested as cancel:
            return Cancelled(step=cancel.step, total_steps=cancel.total)
        inference_s = time.perf_counter() - started
        all_latents = None
        if any(plan.return_latents for plan in plans) and "latents" in final:
            all_latents = final["latents"].detach().to("cpu", torch.float16).contiguous()
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
                    plan=plan,
                    model=loaded.source.name,
                    family=loaded.source.family,
                    device=str(self._device),
                    dtype=dtype_name(self._dtype),
                    latents=latents,
                    timings={"load_s": load_s, "inference_s": inference_s},
                    warnings=[*loaded.warnings, *plan.warnings],
                    batch_jobs=len(plans),
                )
            )
            offset = end
        return results


# Plan fields every job of a batch must share: they shape the one denoising loop.
_SHARED_PLAN_FIELDS = (
    "task",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "scheduler",
    "strength",
)


def check_batchable(plans: list[GenerationPlan]) -> None:
    """Raise InvalidJobError unless the plans can run in one pipeline call."""
    first = plans[0]
    if len(plans) > 1 and any(p.task is Task.INPAINT and p.num_images > 1 for p in plans):
        # see jobs.batch_key_of: diffusers encodes such a job's image with one generator
        raise InvalidJobError("inpainting jobs of several images run alone", field="num_images")
    for plan in plans[1:]:
        for name in _SHARED_PLAN_FIELDS:
            if getattr(plan, name) != getattr(first, name):
                raise InvalidJobError(
                    f"jobs of one batch differ in {name}: {getattr(first, name)!r} vs "
                    f"{getattr(plan, name)!r}",
                    field=name,
                )
        if (plan.negative_prompt is None) != (first.negative_prompt is None):
            raise InvalidJobError(
                "jobs of one batch must all have a negative prompt or all have none",
                field="negative_prompt",
            )


def batch_arguments(
    plans: list[GenerationPlan], inputs: list[dict[str, Image.Image]]
) -> dict[str, Any]:
    """One diffusers call for several jobs: a prompt (and input image) per image, and
    one generator per image seeded as the job alone would seed it."""
    first = plans[0]
    arguments = pipeline_arguments(first)
    per_image: dict[str, list[Any]] = {"prompt": [], "negative_prompt": []}
    for plan, images in zip(plans, inputs, strict=True):
        for _ in range(plan.num_images):
            per_image["prompt"].append(plan.prompt)
            per_image["negative_prompt"].append(plan.negative_prompt)
            for name, image in images.items():
                per_image.setdefault(name, []).append(image)
    arguments |= per_image
    if first.negative_prompt is None:
        arguments["negative_prompt"] = None  # zero embeddings for all (SDXL's default)
    arguments["num_images_per_prompt"] = 1
    arguments["generator"] = [
        torch.Generator("cpu").manual_seed(seed) for plan in plans for seed in plan.seeds
    ]
    return arguments


def pipeline_arguments(plan: GenerationPlan) -> dict[str, Any]:
    """The diffusers call arguments of a plan (inputs images aside), with CPU generators
    so that a seed gives the same initial noise on every device."""
    arguments: dict[str, Any] = {
        "prompt": plan.prompt,
        "negative_prompt": plan.negative_prompt,
        "num_inference_steps": plan.num_inference_steps,
        "guidance_scale": plan.guidance_scale,
        "num_images_per_prompt": plan.num_images,
        "generator": [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds],
    }
    if plan.task is not Task.IMG2IMG:  # img2img takes its size from the image
        arguments |= {"width": plan.width, "height": plan.height}
    if plan.strength is not None:
        arguments["strength"] = plan.strength
    return arguments
