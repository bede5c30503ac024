"""LoRA adapters on a loaded model: load on first use, keep a bounded LRU set loaded,
activate exactly the job's adapters (none for a job without LoRAs). Switching LoRAs
between jobs never reloads the base model: adapters sit beside its weights (PEFT)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdworker.loras import FAMILY_BY_CROSS_ATTENTION_DIM, ResolvedLora

log = logging.getLogger(__name__)


def _family_word(dim: int | None) -> str:
    family = FAMILY_BY_CROSS_ATTENTION_DIM.get(dim or 0)
    return f"{dim}, {family}" if family else str(dim)


@dataclass
class Activation:
    """The LoRAs a job really runs with, and why the others were skipped."""

    applied: list[ResolvedLora] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, problem: str) -> None:
        self.warnings.append(problem)
        log.warning(problem)


class Adapters(Protocol):
    """What the engine needs of a LoRA manager (plain or hotswap)."""

    @property
    def loaded(self) -> list[str]: ...

    def activate(self, loras: tuple[ResolvedLora, ...]) -> Activation: ...


def check_compatible(pipe: Any, lora: ResolvedLora) -> str | None:
    """Why `lora` cannot apply to this model's UNet (another family's cross-attention
    width), or None."""
    expected = int(pipe.unet.config.cross_attention_dim)
    if lora.cross_attention_dim is None or lora.cross_attention_dim == expected:
        return None
    return (
        f"LoRA {lora.name!r} ({lora.field}) skipped: it was made for cross-attention "
        f"{_family_word(lora.cross_attention_dim)}, this model has {_family_word(expected)}"
    )


class LoraAdapters:
    """The adapters loaded into one pipeline's UNet and text encoders."""

    def __init__(self, pipe: Any, *, cache_size: int) -> None:
        self._pipe = pipe
        self._cache_size = cache_size
        self._loaded: OrderedDict[str, tuple[Path, float]] = OrderedDict()
        # (adapter, weight) pairs now active; None after an eviction or a failed load,
        # which leave PEFT's active set unknown, so the next activate() sets it again.
        self._active: tuple[tuple[str, float], ...] | None = ()

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    def activate(self, loras: tuple[ResolvedLora, ...]) -> Activation:
        """Make exactly `loras` active with their weights; LoRAs made for another model
        family, or unloadable, are skipped with a warning: never raises for them."""
        outcome = Activation()
        keep = {lora.adapter_name for lora in loras}
        for lora in loras:
            problem = check_compatible(self._pipe, lora) or self._ensure_loaded(lora, keep)
            if problem:
                outcome.skip(problem)
            else:
                outcome.applied.append(lora)
        wanted = tuple((lora.adapter_name, lora.weight) for lora in outcome.applied)
        if wanted != self._active:
            if wanted:
                self._pipe.enable_lora()
                names = [name for name, _ in wanted]
                self._pipe.set_adapters(names, adapter_weights=[weight for _, weight in wanted])
            elif self._loaded:
                self._pipe.disable_lora()
            self._active = wanted
        return outcome

    def _ensure_loaded(self, lora: ResolvedLora, keep: set[str]) -> str | None:
        """Load `lora` unless loaded; evicts the least recently used adapters that the
        job does not need (a job naming more LoRAs than the cache holds still runs)."""
        stamp = (lora.path, lora.path.stat().st_mtime)
        name = lora.adapter_name
        if self._loaded.get(name) == stamp:
            self._loaded.move_to_end(name)
            return None
        if name in self._loaded:  # the name now points at another (or a changed) file
            self._delete(name)
        evictable = [loaded for loaded in self._loaded if loaded not in keep]
        while len(self._loaded) >= self._cache_size and evictable:
            self._delete(evictable.pop(0))
        # Loading makes the new adapter the only active one: set the job's set again.
        self._active = None
        try:
            self._pipe.load_lora_weights(str(lora.path), adapter_name=name)
        except Exception as exc:  # diffusers/PEFT raise many types for one cause: unusable
            self._forget_partial(name)
            return f"LoRA {lora.name!r} ({lora.field}) skipped: {type(exc).__name__}: {exc}"
        registered = {n for names in self._pipe.get_list_adapters().values() for n in names}
        if name not in registered:  # e.g. a LoRA of another architecture: nothing matched
            return f"LoRA {lora.name!r} ({lora.field}) skipped: none of its layers fit this model"
        self._loaded[name] = stamp
        return None

    def _delete(self, name: str) -> None:
        self._pipe.delete_adapters(name)
        self._loaded.pop(name, None)
        self._active = None

    def _forget_partial(self, name: str) -> None:
        """A failed load may have added the adapter to some modules: remove it."""
        try:
            self._pipe.delete_adapters(name)
        except Exception:  # nothing (or nothing consistent) was loaded under that name
            log.debug("no partial adapter %s to delete", name)
        self._active = None
