"""Shared fixtures: tiny models built once per session in a temporary cache, no network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Tests never reach the hub, and never read a developer's sdworker configuration.
os.environ["HF_HUB_OFFLINE"] = "1"
for _name in list(os.environ):
    if _name.startswith("SDWORKER_") or _name in {
        "SDXL_MODEL_ROOT",
        "MODEL_ROOT",
        "SDXL_MODEL",
        "MODEL",
        "CUDA_DTYPE",
        "CUDA_DEVICE",
        "CUDA_ENABLE_XFORMERS",
        "CUDA_ATTENTION_SLICING",
        "SDXL_REFINER_ID",
        "SDXL_REFINER_MODEL",
        "LORA_PATH",
    }:
        del os.environ[_name]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sdworker-cache")


@pytest.fixture(scope="session")
def tiny_folder(cache_dir: Path) -> Path:
    from sdworker.engine.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny-sdxl", cache_dir)


@pytest.fixture(scope="session")
def settings(cache_dir: Path):  # type: ignore[no-untyped-def]
    from sdworker.settings import Settings

    return Settings(_env_file=None, cache_dir=cache_dir, device="cpu", model="tiny-sdxl")


@pytest.fixture(scope="session")
def engine(settings, tiny_folder):  # type: ignore[no-untyped-def]
    from sdworker.engine.engine import Engine

    return Engine(settings)


def gradient_image(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic, non-uniform RGB test picture."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def half_mask(width: int = 64, height: int = 64) -> Image.Image:
    """White (repaint) on the left half, black (keep) on the right."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    return Image.fromarray(mask, "L")


def max_pixel_difference(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real redis-server for the session; tests isolate themselves by key prefix."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()
