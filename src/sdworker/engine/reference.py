"""Reference images through an IP-Adapter: style (InstantStyle: only the UNet's style
layers see the image) or character (every layer). Loaded on the first reference job,
unloaded before a job without one (a loaded IP-Adapter makes every call need an image)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdworker.errors import ModelLoadError
from sdworker.options import ReferenceType
from sdworker.settings import Settings


def split_weights_location(location: str) -> tuple[str, str, str]:
    """'path/to/ip-adapter.safetensors' or 'org/repo/subfolder/weight.safetensors' ->
    (folder or hub id, subfolder, weight name) for diffusers' load_ip_adapter."""
    path = Path(location).expanduser()
    if path.is_file():
        return str(path.parent), "", path.name
    parts = location.strip("/").split("/")
    if len(parts) < 3:
        raise ModelLoadError(
            f"SDWORKER_IP_ADAPTER={location!r}: give a weight file, or "
            "org/repo/[subfolder/]weight_name on the hub",
            field="reference_type",
        )
    return "/".join(parts[:2]), "/".join(parts[2:-1]), parts[-1]


def ip_adapter_scale(unet: Any, kind: ReferenceType, scale: float) -> float | dict[str, Any]:
    """Character: one scale for every layer. Style: only the second attention of the
    first up block, the layer InstantStyle found to carry style and not layout."""
    if kind is not ReferenceType.STYLE:
        return scale
    attentions = (
        len(unet.up_blocks[0].attentions) if hasattr(unet.up_blocks[0], "attentions") else 0
    )
    if attentions == 0:
        return scale
    per_layer = [0.0] * attentions
    per_layer[min(1, attentions - 1)] = scale
    return {"up": {"block_0": per_layer}}


class IpAdapter:
    """The configured IP-Adapter and image encoder, on or off one pipeline."""

    def __init__(self, settings: Settings, device: torch.device, dtype: torch.dtype) -> None:
        self._settings = settings
        self._device = device
        self._dtype = dtype
        self._loaded_on: Any = None
        self._encoder: Any = None

    def sync(self, pipe: Any, wanted: bool) -> None:
        """Load onto `pipe` when wanted, unload when not (no-op when already so)."""
        if wanted and self._loaded_on is not pipe:
            if self._loaded_on is not None:
                self.unload()
            self._load(pipe)
        elif not wanted and self._loaded_on is not None:
            self.unload()

    def forget_if(self, pipe: Any) -> None:
        """The pipeline it was loaded on is being unloaded (with its adapter)."""
        if self._loaded_on is pipe:
            self._loaded_on = None

    def forget(self) -> None:
        """The pipeline was dropped (model unloaded): nothing is loaded any more."""
        self._loaded_on = None

    def unload(self) -> None:
        if self._loaded_on is not None:
            self._loaded_on.unload_ip_adapter()
            self._loaded_on = None

    def _load(self, pipe: Any) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        weights, encoder = self._settings.ip_adapter, self._settings.ip_adapter_image_encoder
        if not weights or not encoder:
            raise ModelLoadError(
                "style/character references need SDWORKER_IP_ADAPTER and "
                "SDWORKER_IP_ADAPTER_IMAGE_ENCODER",
                field="reference_type",
            )
        folder, subfolder, weight_name = split_weights_location(weights)
        try:
            if self._encoder is None:  # kept once loaded: a mixed queue reloads no encoder
                location = Path(encoder).expanduser()
                self._encoder = CLIPVisionModelWithProjection.from_pretrained(
                    str(location) if location.exists() else encoder, dtype=self._dtype
                ).to(self._device)
            image_encoder = self._encoder
            # Sized to the encoder, as diffusers does when it loads the encoder itself.
            size = image_encoder.config.image_size
            extractor = CLIPImageProcessor(size=size, crop_size=size)
            pipe.register_modules(image_encoder=image_encoder, feature_extractor=extractor)
            pipe.load_ip_adapter(
                folder, subfolder=subfolder, weight_name=weight_name, image_encoder_folder=None
            )
        except Exception as exc:  # any load failure is a configuration problem
            raise ModelLoadError(
                f"IP-Adapter {weights!r} with image encoder {encoder!r} failed to load: "
                f"{type(exc).__name__}: {exc}",
                field="reference_type",
            ) from exc
        self._loaded_on = pipe
