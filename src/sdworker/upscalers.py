"""The upscaler-model folder: ESRGAN-family weight files by name (no torch here)."""

from __future__ import annotations

from pathlib import Path

UPSCALER_SUFFIXES = (".pth", ".safetensors", ".pt")


def upscaler_names(folder: Path | None) -> tuple[str, ...]:
    """Names (file names without extension) of the upscaler weights in a folder."""
    if folder is None or not folder.is_dir():
        return ()
    return tuple(
        sorted(
            path.stem
            for path in folder.iterdir()
            if path.suffix in UPSCALER_SUFFIXES and path.is_file()
        )
    )


def upscaler_path(folder: Path | None, name: str) -> Path | None:
    """The weight file of an upscaler name, or None."""
    if folder is None or "/" in name or "\\" in name or name in {"", ".", ".."}:
        return None
    for suffix in UPSCALER_SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return path
    return None
