"""LoRAs on a compiled UNet without recompiling: fixed adapter slots, hotswapped.

Loading or activating PEFT adapters changes the UNet's modules or Python attributes,
which torch.compile guards on, so every new LoRA set would recompile. Instead, before
compiling, the UNet gets `slots` zero adapters of rank `max_rank` on every linear layer,
with their scalings turned into tensors (peft's prepare_model_for_compiled_hotswap). A
job's LoRAs are then swapped into the slots in place (diffusers' `hotswap=True`), and
each slot's weight is written into its scaling tensors in place; unused slots get
weight 0, which adds exactly nothing. Text-encoder layers (not compiled) load as normal
adapters. Images equal diffusers' own load_lora_weights + set_adapters (tested).

The cost: every linear layer of the UNet's transformer blocks carries `slots`
rank-`max_rank` LoRA matmuls on every job, LoRA or not: rank x (in + out) / (in x out)
more FLOPs in those layers per slot, 3-5% at rank 32 on SDXL's 1280-wide layers.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from sdworker.engine.adapters import check_compatible
from sdworker.loras import ResolvedLora

log = logging.getLogger(__name__)

_UNET_PREFIXES = ("unet.", "lora_unet_")
Stamp = tuple[Path, float]


def split_lora_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A LoRA file's (UNet part, text-encoder part), in its own format (PEFT or kohya)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    unet = {key: value for key, value in state.items() if key.startswith(_UNET_PREFIXES)}
    text = {key: value for key, value in state.items() if key not in unet}
    return unet, text


def _down_weights(state: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [
        value
        for key, value in state.items()
        if key.endswith(("lora_A.weight", "lora_down.weight", "lora.down.weight"))
    ]


class HotswapLoras:
    """Activates a job's LoRAs on a UNet that is (or will be) compiled."""

    def __init__(self, pipe: Any, *, slots: int, max_rank: int, cache_size: int) -> None:
        self._pipe = pipe
        self._max_rank = max_rank
        self._cache_size = cache_size
        self._slots = [f"sdw-slot{index}" for index in range(slots)]
        self._slot_files: list[Stamp | None] = [None] * slots
        self._slot_scalings: list[dict[int, torch.Tensor]] = [{} for _ in range(slots)]
        self._text: OrderedDict[str, Stamp] = OrderedDict()  # text-encoder adapters
        # The layers LoRAs train: every linear layer of the transformer blocks (attention
        # projections, feed-forward, proj_in/proj_out), as kohya and diffusers trainers do.
        self._targets = {
            name: (module.in_features, module.out_features, module.weight.dtype)
            for name, module in pipe.unet.named_modules()
            if isinstance(module, torch.nn.Linear) and ".attentions." in f".{name}"
        }
        self._prepare()

    @property
    def loaded(self) -> list[str]:
        files = [
            f"{slot}={stamp[0].name}"
            for slot, stamp in zip(self._slots, self._slot_files, strict=True)
            if stamp
        ]
        return files + list(self._text)

    def _prepare(self) -> None:
        """Zero adapters in every slot, then scalings as tensors (before compiling)."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = self._pipe.unet
        for slot in self._slots:
            if slot not in self._unet_adapters():
                # Fresh tensors per slot: PEFT may keep the given tensors as the weights,
                # and an in-place swap into one slot must not write into another.
                self._pipe.load_lora_weights(self._zero_state(), adapter_name=slot)
        unet.set_adapters(self._slots, [1.0] * len(self._slots))
        prepare_model_for_compiled_hotswap(
            unet, target_rank=self._max_rank, check_compiled="ignore"
        )
        self._layers = [m for m in unet.modules() if hasattr(m, "scaling") and hasattr(m, "r")]
        for index in range(len(self._slots)):
            self._slot_files[index] = None
            self._slot_scalings[index] = {}
            self._weigh(index, 0.0)

    def _zero_state(self) -> dict[str, torch.Tensor]:
        zero: dict[str, torch.Tensor] = {}
        rank = self._max_rank
        for name, (features_in, features_out, dtype) in self._targets.items():
            zero[f"unet.{name}.lora_A.weight"] = torch.zeros(rank, features_in, dtype=dtype)
            zero[f"unet.{name}.lora_B.weight"] = torch.zeros(features_out, rank, dtype=dtype)
        return zero

    def _unet_adapters(self) -> set[str]:
        return set(self._pipe.get_list_adapters().get("unet", []))

    def activate(self, loras: tuple[ResolvedLora, ...]) -> list[str]:
        """Swap the job's LoRAs into the slots with their weights; the rest weigh 0.
        Returns warnings for LoRAs that were skipped; never raises for them."""
        warnings: list[str] = []
        placed: list[tuple[int, float]] = []
        text: list[tuple[str, float]] = []
        for lora in loras:
            problem = check_compatible(self._pipe, lora)
            if problem is None and len(placed) == len(self._slots):
                problem = (
                    f"LoRA {lora.name!r} ({lora.field}) skipped: a compiled model takes at most "
                    f"{len(self._slots)} LoRAs per job (SDWORKER_LORA_HOTSWAP_SLOTS)"
                )
            if problem is None:
                problem = self._place(len(placed), lora, text)
            if problem:
                warnings.append(problem)
                log.warning(problem)
            else:
                placed.append((len(placed), lora.weight))
        for index in range(len(self._slots)):
            weight = next((w for i, w in placed if i == index), 0.0)
            self._weigh(index, weight)
        self._activate_text(text)
        return warnings

    def _place(self, index: int, lora: ResolvedLora, text: list[tuple[str, float]]) -> str | None:
        stamp = (lora.path, lora.path.stat().st_mtime)
        unet_part, text_part = split_lora_file(lora.path)
        if any(weight.dim() != 2 for weight in _down_weights(unet_part)):
            return (
                f"LoRA {lora.name!r} ({lora.field}) skipped: it has convolution layers, "
                "which a compiled model's LoRA slots do not cover"
            )
        ranks = [weight.shape[0] for weight in _down_weights(unet_part)]
        if ranks and max(ranks) > self._max_rank:
            return (
                f"LoRA {lora.name!r} ({lora.field}) skipped: rank {max(ranks)} is over "
                f"SDWORKER_LORA_MAX_RANK={self._max_rank}"
            )
        if self._slot_files[index] != stamp and unet_part:
            try:
                self._pipe.load_lora_weights(
                    unet_part, adapter_name=self._slots[index], hotswap=True
                )
            except Exception as exc:  # diffusers deletes the slot's adapter on failure
                self._prepare()
                return f"LoRA {lora.name!r} ({lora.field}) skipped: {type(exc).__name__}: {exc}"
            # diffusers leaves only the swapped adapter active: all slots again (layer by
            # layer: the pipeline's set_adapters would turn the scalings back into floats).
            for layer in self._layers:
                layer.set_adapter(self._slots)
            self._slot_files[index] = stamp
            self._slot_scalings[index] = {
                id(layer): layer.scaling[self._slots[index]].detach().clone()
                for layer in self._layers
                if self._slots[index] in layer.scaling
            }
        if text_part:
            problem = self._load_text(lora, text_part, stamp)
            if problem:
                return problem
            text.append((lora.adapter_name, lora.weight))
        return None

    def _weigh(self, index: int, weight: float) -> None:
        """Write weight x the file's own scaling into the slot's tensors, in place."""
        slot, scalings = self._slots[index], self._slot_scalings[index]
        for layer in self._layers:
            tensor = layer.scaling.get(slot)
            if isinstance(tensor, torch.Tensor):
                base = scalings.get(id(layer))
                tensor.copy_(base * weight if base is not None else torch.zeros_like(tensor))

    def _load_text(
        self, lora: ResolvedLora, part: dict[str, torch.Tensor], stamp: Stamp
    ) -> str | None:
        name = lora.adapter_name
        if self._text.get(name) == stamp:
            self._text.move_to_end(name)
            return None
        if name in self._text:
            self._delete_text(name)
        while len(self._text) >= self._cache_size:
            self._delete_text(next(iter(self._text)))
        try:
            self._pipe.load_lora_weights(part, adapter_name=name)
        except Exception as exc:  # unusable text-encoder layers: skip the LoRA
            return f"LoRA {lora.name!r} ({lora.field}) skipped: {type(exc).__name__}: {exc}"
        self._text[name] = stamp
        return None

    def _encoders(self) -> list[Any]:
        return [
            encoder
            for encoder in (
                getattr(self._pipe, "text_encoder", None),
                getattr(self._pipe, "text_encoder_2", None),
            )
            if encoder is not None
        ]

    def _delete_text(self, name: str) -> None:
        for encoder in self._encoders():
            if name in getattr(encoder, "peft_config", {}):
                encoder.delete_adapter(name)
        self._text.pop(name, None)

    def _activate_text(self, wanted: list[tuple[str, float]]) -> None:
        from diffusers.loaders.lora_base import (
            disable_lora_for_text_encoder,
            enable_lora_for_text_encoder,
            set_adapters_for_text_encoder,
        )

        for encoder in self._encoders():
            present = getattr(encoder, "peft_config", {})
            mine = [(name, weight) for name, weight in wanted if name in present]
            if mine:
                enable_lora_for_text_encoder(encoder)
                set_adapters_for_text_encoder(
                    [name for name, _ in mine], encoder, [weight for _, weight in mine]
                )
            elif present:
                disable_lora_for_text_encoder(encoder)
