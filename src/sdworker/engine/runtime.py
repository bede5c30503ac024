"""Where and how models run: device and dtype selection, memory and speed switches."""

from __future__ import annotations

import importlib.util
import logging
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


def apply_pipeline_options(pipe: Any, settings: Settings, device: torch.device) -> list[str]:
    """Put a pipeline on its device with the configured memory/speed switches.

    Returns warnings for switches that were asked for but could not be honoured.
    """
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
    if settings.compile_unet and not isinstance(
        pipe.unet, torch._dynamo.eval_frame.OptimizedModule
    ):
        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    for warning in warnings:
        log.warning(warning)
    return warnings
