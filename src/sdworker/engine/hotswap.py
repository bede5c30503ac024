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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdworker.engine.adapters import Activation, check_compatible
from sdworker.loras import ResolvedLora

log = logging.getLogger(__name__)

_UNET_PREFIXES = ("unet.", "lora_unet_")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te")
Stamp = tuple[Path, float]


@dataclass(frozen=True)
class LoraParts:
    """A LoRA file's tensors by where they go, in the file's own format (PEFT or kohya)."""

    unet: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    other: dict[str, torch.Tensor]


def split_lora_file(path: Path) -> LoraParts:
    from safetensors.torch import load_file

    state = load_file(str(path))
    unet = {key: value for key, value in state.items() if key.startswith(_UNET_PREFIXES)}
    text = {key: value for key, value in state.items() if key.startswith(_TEXT_PREFIXES)}
    other = {key: value for key, value in state.items() if key not in unet and key not in text}
    return LoraParts(unet, text, other)


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
        for slot in self._slots:
            # Fresh tensors per slot: PEFT may keep the given tensors as the weights, and
            # an in-place swap into one slot must not write into another.
            self._pipe.load_lora_weights(self._zero_state(), adapter_name=slot)
        self._finish_slots()
        for index in range(len(self._slots)):
            self._weigh(index, 0.0)

    def _finish_slots(self) -> None:
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = self._pipe.unet
        self._layers = [m for m in unet.modules() if hasattr(m, "scaling") and hasattr(m, "r")]
        # Layer by layer: the pipeline's set_adapters would turn tensor scalings to floats.
        for layer in self._layers:
            layer.set_adapter(self._slots)
        prepare_model_for_compiled_hotswap(
            unet, target_rank=self._max_rank, check_compiled="ignore"
        )

    def _rebuild_slot(self, index: int) -> None:
        """diffusers deletes a slot's adapter when a swap into it fails: a zero one again
        (this one load recompiles the UNet)."""
        slot = self._slots[index]
        if slot not in set(self._pipe.get_list_adapters().get("unet", [])):
            self._pipe.load_lora_weights(self._zero_state(), adapter_name=slot)
        self._finish_slots()
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

    def activate(self, loras: tuple[ResolvedLora, ...]) -> Activation:
        """Swap the job's LoRAs into the slots with their weights; the rest weigh 0.
        LoRAs that cannot apply are skipped with a warning; never raises for them."""
        outcome = Activation()
        weights = [0.0] * len(self._slots)
        text: list[tuple[str, float]] = []
        keep = {lora.adapter_name for lora in loras}
        used = 0
        for lora in loras:
            problem = check_compatible(self._pipe, lora)
            parts = None if problem else split_lora_file(lora.path)
            if parts is not None:
                problem = self._refusal(lora, parts, used)
            if problem is None and parts is not None:
                problem = self._apply(lora, parts, used, keep)
            if problem:
                outcome.skip(problem)
                continue
            assert parts is not None
            if parts.unet:
                weights[used] = lora.weight
                used += 1
            if parts.text:
                text.append((lora.adapter_name, lora.weight))
            outcome.applied.append(lora)
        for index, weight in enumerate(weights):
            self._weigh(index, weight)
        self._activate_text(text)
        return outcome

    def _refusal(self, lora: ResolvedLora, parts: LoraParts, used: int) -> str | None:
        """Why the slots cannot hold this LoRA, before anything is loaded."""
        where = f"LoRA {lora.name!r} ({lora.field}) skipped"
        if parts.other:
            sample = next(iter(parts.other))
            return f"{where}: layer names it does not know how to place (e.g. {sample})"
        down = _down_weights(parts.unet)
        if any(weight.dim() != 2 for weight in down):
            return f"{where}: it has convolution layers, which the compiled model's slots lack"
        if down and max(weight.shape[0] for weight in down) > self._max_rank:
            rank = max(weight.shape[0] for weight in down)
            return f"{where}: rank {rank} is over SDWORKER_LORA_MAX_RANK={self._max_rank}"
        if parts.unet and used == len(self._slots):
            return (
                f"{where}: a compiled model takes at most {len(self._slots)} LoRAs per job "
                "(SDWORKER_LORA_HOTSWAP_SLOTS)"
            )
        return None

    def _apply(
        self, lora: ResolvedLora, parts: LoraParts, index: int, keep: set[str]
    ) -> str | None:
        stamp = (lora.path, lora.path.stat().st_mtime)
        if parts.text:
            problem = self._load_text(lora, parts.text, stamp, keep)
            if problem:
                return problem
        if parts.unet and self._slot_files[index] != stamp:
            try:
                self._pipe.load_lora_weights(
                    dict(parts.unet), adapter_name=self._slots[index], hotswap=True
                )
            except Exception as exc:  # diffusers deleted the slot's adapter: rebuild it
                self._rebuild_slot(index)
                return f"LoRA {lora.name!r} ({lora.field}) skipped: {type(exc).__name__}: {exc}"
            # diffusers leaves only the swapped adapter active: all slots again.
            for layer in self._layers:
                layer.set_adapter(self._slots)
            self._slot_files[index] = stamp
            self._slot_scalings[index] = {
                id(layer): layer.scaling[self._slots[index]].detach().clone()
                for layer in self._layers
                if self._slots[index] in layer.scaling
            }
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
        self, lora: ResolvedLora, part: dict[str, torch.Tensor], stamp: Stamp, keep: set[str]
    ) -> str | None:
        name = lora.adapter_name
        if self._text.get(name) == stamp:
            self._text.move_to_end(name)
            return None
        if name in self._text:
            self._delete_text(name)
        evictable = [name for name in self._text if name not in keep]
        while len(self._text) >= self._cache_size and evictable:
            self._delete_text(evictable.pop(0))
        try:
            self._pipe.load_lora_weights(dict(part), adapter_name=name)
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
