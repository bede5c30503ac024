"""Super-resolution: Lanczos resampling, and ESRGAN-family upscaler models loaded with
spandrel (any of the architectures it detects from a weight file's keys)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdworker.errors import ModelLoadError


def lanczos(image: Image.Image, factor: int) -> Image.Image:
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.LANCZOS)


def _spandrel() -> Any:
    try:
        import spandrel
    except ImportError as exc:
        raise ModelLoadError(
            "upscaler models need spandrel (and torchvision): pip install 'sdworker[upscale]' "
            f"({exc})",
            field="upscaler",
        ) from exc
    return spandrel


class UpscalerModels:
    """Upscaler models by path, loaded once and kept (they are small: 1-70 MB)."""

    def __init__(self, device: torch.device, *, tile: int = 512, overlap: int = 32) -> None:
        """tile: largest input side run in one piece (0: whole images); overlap: context
        around each tile, cut away after (at least the model's receptive-field radius
        makes tiled and whole outputs equal)."""
        self._device = device
        self._tile = tile
        self._overlap = overlap
        self._models: dict[Path, Any] = {}
        self._lock = threading.Lock()

    def load(self, path: Path) -> Any:
        with self._lock:
            model = self._models.get(path)
            if model is None:
                spandrel = _spandrel()
                try:
                    model = spandrel.ModelLoader().load_from_file(str(path))
                except Exception as exc:  # unsupported or corrupt weights
                    raise ModelLoadError(
                        f"upscaler {path.name} is not a model spandrel can load: "
                        f"{type(exc).__name__}: {exc}",
                        field="upscaler",
                    ) from exc
                if not isinstance(model, spandrel.ImageModelDescriptor):
                    raise ModelLoadError(
                        f"upscaler {path.name} is not an image-to-image model", field="upscaler"
                    )
                model.to(self._device).eval()
                self._models[path] = model
            return model

    def upscale(self, path: Path, image: Image.Image, factor: int) -> Image.Image:
        """Run the model; when its own scale differs from `factor`, resample its output
        to the asked size with Lanczos (as other UIs do for a 4x model asked for 2x)."""
        model = self.load(path)
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
        tensor = tensor.to(self._device, next(model.model.parameters()).dtype)
        with torch.inference_mode():
            output = self._run_tiled(model, tensor)
        result = output.squeeze(0).float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        upscaled = Image.fromarray((result * 255.0).round().astype(np.uint8))
        target = (image.width * factor, image.height * factor)
        if upscaled.size != target:
            upscaled = upscaled.resize(target, Image.Resampling.LANCZOS)
        return upscaled

    def _run_tiled(self, model: Any, tensor: torch.Tensor) -> torch.Tensor:
        """The model over tiles of the image (bounded memory for any size), each with
        `overlap` pixels of context on every side that is cut away from its output.
        Written by hand: spandrel pads to size requirements but does not tile."""
        _, _, height, width = tensor.shape
        if self._tile <= 0 or max(height, width) <= self._tile:
            return model(tensor)  # type: ignore[no-any-return]
        scale, tile, overlap = int(model.scale), self._tile, self._overlap
        out = torch.empty(1, 3, height * scale, width * scale, dtype=torch.float32)
        for top in range(0, height, tile):
            for left in range(0, width, tile):
                bottom, right = min(top + tile, height), min(left + tile, width)
                y0, x0 = max(top - overlap, 0), max(left - overlap, 0)
                y1, x1 = min(bottom + overlap, height), min(right + overlap, width)
                piece = model(tensor[..., y0:y1, x0:x1]).float().cpu()
                cy, cx = (top - y0) * scale, (left - x0) * scale
                out[..., top * scale : bottom * scale, left * scale : right * scale] = piece[
                    ..., cy : cy + (bottom - top) * scale, cx : cx + (right - left) * scale
                ]
        return out
