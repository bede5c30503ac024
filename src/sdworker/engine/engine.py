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
    apply_pipeline_options,
    dtype_name,
    select_device,
    select_dtype,
)
from sdworker.engine.schedulers import build_scheduler, find_scheduler
from sdworker.errors import OutOfMemoryError
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
    load_s: float
    warnings: list[str]


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
        warnings = apply_pipeline_options(base, self._settings, self._device)
        on_switch = None
        if self._settings.cpu_offload and self._device.type == "cuda":
            device = self._device

            def on_switch(pipe: Any) -> None:
                pipe.enable_model_cpu_offload(device=device)

        self._loaded = LoadedModel(
            source=source,
            pipelines=PipelineSet(base, on_switch),
            scheduler_config=base.scheduler.config,
            load_s=time.perf_counter() - started,
            warnings=warnings,
        )
        return self._loaded

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
        plan = self.plan(spec)
        inputs = self._prepare_inputs(plan)
        source = self.source(spec.model)
        with self._lock:
            already_loaded = self._loaded is not None and self._loaded.source == source
            loaded = self._load_locked(source)
            load_s = 0.0 if already_loaded else loaded.load_s
            try:
                return self._generate(loaded, plan, inputs, on_step, is_cancelled, load_s)
            except torch.OutOfMemoryError as exc:
                gc.collect()
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                raise OutOfMemoryError(
                    f"out of device memory for {plan.num_images} image(s) at "
                    f"{plan.width}x{plan.height}; try fewer images or a smaller size"
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
        plan: GenerationPlan,
        inputs: dict[str, Image.Image],
        on_step: StepCallback | None,
        is_cancelled: CancelCheck | None,
        load_s: float,
    ) -> EngineResult | Cancelled:
        pipe = loaded.pipelines.for_task(plan.task)
        pipe.scheduler = build_scheduler(
            find_scheduler(plan.scheduler), loaded.scheduler_config, plan.seeds
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

        arguments = pipeline_arguments(plan) | inputs
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = pipe(**arguments, callback_on_step_end=step_end, output_type="pil")
        except _CancelRequested as cancel:
            return Cancelled(step=cancel.step, total_steps=cancel.total)
        inference_s = time.perf_counter() - started
        latents = None
        if plan.return_latents and "latents" in final:
            tensor = final["latents"].detach().to("cpu", torch.float16).contiguous()
            latents = Latents(data=tensor.numpy().tobytes(), shape=tuple(tensor.shape))
        return EngineResult(
            images=list(output.images),
            seeds=list(plan.seeds),
            plan=plan,
            model=loaded.source.name,
            family=loaded.source.family,
            device=str(self._device),
            dtype=dtype_name(self._dtype),
            latents=latents,
            timings={"load_s": load_s, "inference_s": inference_s},
            warnings=[*loaded.warnings, *plan.warnings],
        )


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
