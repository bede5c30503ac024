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

    def __init__(self, device: torch.device) -> None:
        self._device = device
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
        with torch.inference_mode():
            output = model(tensor.to(self._device, next(model.model.parameters()).dtype))
        result = output.squeeze(0).float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        upscaled = Image.fromarray((result * 255.0).round().astype(np.uint8))
        target = (image.width * factor, image.height * factor)
        if upscaled.size != target:
            upscaled = upscaled.resize(target, Image.Resampling.LANCZOS)
        return upscaled
