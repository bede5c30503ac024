"""Where and how models run: device and dtype selection, memory and speed switches."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdworker.settings import DtypeName, Settings

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}


def select_device(setting: str) -> torch.device:
    """auto picks cuda > mps > cpu; an explicit device that is absent is an error."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} was asked for but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {setting!r} was asked for but MPS is not available")
    return device


def select_dtype(setting: DtypeName, device: torch.device) -> torch.dtype:
    """auto: fp16 on accelerators, fp32 on CPU (CPU half-precision kernels are slow or missing)."""
    if setting == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return _DTYPES[setting]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in _DTYPES.items() if value == dtype)


@dataclass(frozen=True)
class SpeedOptions:
    """The fast-path switches of settings, with every `auto` resolved for a device."""

    channels_last: bool
    fuse_qkv: bool
    fuse_unet: bool  # False when LoRA/IP-Adapter may load: they need the separate projections
    vae_dtype: torch.dtype | None  # None: diffusers' own handling (the model's dtype)
    compile: str  # off | regional | full
    compile_vae: bool
    compile_mode: str
    warmup: bool

    def describe(self) -> dict[str, object]:
        """For /status and benchmark reports."""
        return {
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "fuse_unet_qkv": self.fuse_unet,
            "vae_dtype": dtype_name(self.vae_dtype) if self.vae_dtype else "model",
            "compile": self.compile,
            "compile_vae": self.compile_vae,
            "compile_mode": self.compile_mode,
            "warmup": self.warmup,
        }


def _switch(value: str, auto: bool) -> bool:
    return auto if value == "auto" else value == "on"


def resolve_speed_options(
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    *,
    vae_force_upcast: bool,
    adapters: bool = False,
) -> SpeedOptions:
    """Defaults per device: CUDA gets the whole fast path, CPU and MPS stay eager (on the
    CPU, compile time dwarfs any gain and channels-last is slower; see bench/RESULTS.md).
    `adapters`: LoRAs or an IP-Adapter may load, so the UNet keeps its separate q/k/v."""
    cuda = device.type == "cuda"
    compile_mode = settings.compile if settings.compile != "auto" else "regional" if cuda else "off"
    compiled = compile_mode != "off"
    return SpeedOptions(
        channels_last=_switch(settings.channels_last, cuda),
        fuse_qkv=_switch(settings.fuse_qkv, cuda),
        fuse_unet=_switch(settings.fuse_qkv, cuda) and not adapters,
        vae_dtype=_vae_dtype(settings.vae_dtype, device, dtype, vae_force_upcast),
        compile=compile_mode,
        compile_vae=_switch(settings.compile_vae, compiled),
        compile_mode=settings.compile_mode,
        warmup=_switch(settings.warmup, compiled),
    )


def _vae_dtype(
    setting: DtypeName, device: torch.device, dtype: torch.dtype, force_upcast: bool
) -> torch.dtype | None:
    if device.type == "mps":
        # diffusers moves an MPS VAE back to the latents' dtype on every decode, so a
        # VAE of its own dtype cannot stay: keep diffusers' own handling there.
        return None
    if setting != "auto":
        chosen = _DTYPES[setting]
        # Explicit fp16 on an fp16 model still matters: it turns off diffusers' upcast.
        unchanged = chosen == dtype and not (chosen == torch.float16 and force_upcast)
        return None if unchanged else chosen
    if device.type != "cuda" or dtype != torch.float16 or not force_upcast:
        return None
    # SDXL's VAE overflows in fp16; diffusers then upcasts it to fp32 and back on every
    # call. bf16 has fp32's range at fp16's cost; fp32 kept resident where bf16 is only
    # emulated (before Ampere).
    if torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def _cast_inputs_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    target = next(module.parameters()).dtype
    return tuple(
        a.to(target) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args
    )


def set_vae_dtype(vae: Any, dtype: torch.dtype) -> None:
    """Keep the VAE in its own dtype: pipelines hand it tensors in the UNet's dtype, so its
    entry modules cast their inputs (outputs are cast back by the pipelines already).
    Idempotent: pipelines made with from_pipe re-cast shared modules, so this reruns."""
    vae.to(dtype=dtype)
    # Stops the pipelines' own per-call fp32 upcast (and their casting the VAE back).
    vae.register_to_config(force_upcast=False)
    if getattr(vae, "_sdworker_cast_hooks", False):
        return
    for name in ("encoder", "decoder", "quant_conv", "post_quant_conv"):
        module = getattr(vae, name, None)
        if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters()):
            module.register_forward_pre_hook(_cast_inputs_hook)
    vae._sdworker_cast_hooks = True


def drop_unfused_projections(model: torch.nn.Module) -> None:
    """diffusers' fuse_projections adds the fused to_qkv/to_kv layers but keeps the
    separate ones, which its fused processor no longer calls: about 1.3 GB of fp16 SDXL
    UNet weights. (LoRA loading must come before fusing, or reload the model.)"""
    for module in model.modules():
        if not getattr(module, "fused_projections", False):
            continue
        unused = ("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v")
        for name in unused:
            if hasattr(module, name):
                delattr(module, name)


def enable_compile_cache(path: Path) -> None:
    """Point Inductor and Triton at a persistent folder, so a restarted worker loads its
    compiled kernels instead of compiling again (PyTorch keys the cache by graph, inputs
    and versions, so a stale entry is never used)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path / "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(path / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


UNET_FAMILIES = ("sd15", "sd21", "sdxl")


def denoiser(pipe: Any) -> Any:
    """The UNet (SD 1.x/2.x/XL) or transformer (SD3 MMDiT, Wan) of a pipeline."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def apply_pipeline_options(
    pipe: Any,
    settings: Settings,
    device: torch.device,
    speed: SpeedOptions,
    *,
    family: str = "sdxl",
) -> list[str]:
    """Put a pipeline on its device with the configured memory and speed switches.

    Returns warnings for switches that were asked for but could not be honoured.
    """
    warnings = _apply_memory_options(pipe, settings, device)
    if family == "wan-t2v" and _switch(settings.video_vae_tiling, device.type == "cuda"):
        # 81 frames at 720p decode in tiles and one video at a time: bounded memory.
        pipe.vae.enable_tiling()
        pipe.vae.enable_slicing()
    unet_family = family in UNET_FAMILIES
    if speed.fuse_qkv and unet_family:
        if settings.attention_slicing or settings.enable_xformers:
            warnings.append("fuse_qkv is off: it needs SDPA attention (no slicing or xformers)")
        else:
            pipe.fuse_qkv_projections(unet=speed.fuse_unet, vae=True)
            for model in (pipe.unet, pipe.vae) if speed.fuse_unet else (pipe.vae,):
                drop_unfused_projections(model)
    if speed.vae_dtype is not None:
        set_vae_dtype(pipe.vae, speed.vae_dtype)
    if speed.channels_last and unet_family:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    _compile(pipe, speed, settings.compile_cache_path)
    pipe.set_progress_bar_config(disable=True)
    for warning in warnings:
        log.warning(warning)
    return warnings


def _apply_memory_options(pipe: Any, settings: Settings, device: torch.device) -> list[str]:
    warnings: list[str] = []
    if settings.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        if settings.cpu_offload:
            warnings.append("cpu_offload needs a CUDA device; ignored")
        pipe.to(device)
    if settings.enable_xformers:
        if importlib.util.find_spec("xformers") is None:
            warnings.append(
                "enable_xformers is set but xformers is not installed; using PyTorch SDPA "
                "(pip install xformers to use it)"
            )
        else:
            pipe.enable_xformers_memory_efficient_attention()
    if settings.attention_slicing:
        pipe.enable_attention_slicing()
    if settings.vae_slicing:
        pipe.vae.enable_slicing()
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    return warnings


def apply_refiner_options(
    pipe: Any, settings: Settings, device: torch.device, speed: SpeedOptions
) -> list[str]:
    """The refiner's own UNet gets the base's device, memory and speed switches; its VAE
    and text encoder are the base's, already set up (and compiled) with it."""
    warnings = _apply_memory_options(pipe, settings, device)
    if speed.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    _compile(pipe, replace(speed, compile_vae=False), settings.compile_cache_path)
    pipe.set_progress_bar_config(disable=True)
    return warnings


def _compile(pipe: Any, speed: SpeedOptions, cache_dir: Path) -> None:
    if speed.compile == "off" and not speed.compile_vae:
        return
    enable_compile_cache(cache_dir)
    options = {"mode": speed.compile_mode, "fullgraph": False}
    model = denoiser(pipe)
    if speed.compile == "regional" and getattr(model, "_repeated_blocks", None):
        # Compiles the repeated transformer block once per shape and reuses the code for
        # all of them (70 in SDXL): a fraction of a full compile's time for most of its speed.
        model.compile_repeated_blocks(**options)
    elif speed.compile != "off":
        model.compile(**options)
    if speed.compile_vae:
        pipe.vae.decoder.compile(**options)
