"""The models one worker holds loaded: load on first use, least recently used out when
a memory budget would be passed, never two loads of one model."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

GIB = 1024**3


@dataclass(frozen=True)
class Resident:
    """A loaded model as the registry accounts for it."""

    name: str
    bytes: int


class LoadedModels(Generic[K, V]):
    """Loaded models keyed by source, in least-recently-used order.

    One lock serializes loads: a worker has one device, so two loads at once would only
    compete for its memory, and a second caller asking for a model that is loading waits
    for it and gets the same object (never a double load)."""

    def __init__(
        self,
        load: Callable[[K], V],
        size_of: Callable[[V], int],
        *,
        budget_bytes: int | None,
        estimate: Callable[[K], int | None] = lambda key: None,
        on_unload: Callable[[K, V], None] | None = None,
        name_of: Callable[[K], str] = str,
    ) -> None:
        self._load = load
        self._size_of = size_of
        self._estimate = estimate
        self._on_unload = on_unload
        self._name_of = name_of
        self.budget_bytes = budget_bytes
        self._models: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.loads = 0  # loads done (for /status, tests and the switch benchmark)
        self.warnings: list[str] = []

    def get(self, key: K) -> tuple[V, bool]:
        """The loaded model for `key` (loading it, and making room, when needed);
        True when this call loaded it."""
        with self._lock:
            held = self._models.get(key)
            if held is not None:
                self._models.move_to_end(key)
                return held[0], False
            estimate = self._estimate(key)
            if estimate is not None:
                self._make_room(estimate)
            model = self._load(key)
            self.loads += 1
            size = self._size_of(model)
            self._models[key] = (model, size)
            self._make_room(0, keep=key)
            return model, True

    def _make_room(self, needed: int, keep: K | None = None) -> None:
        if self.budget_bytes is None:
            return
        while self.used_bytes + needed > self.budget_bytes:
            victim = next((k for k in self._models if k != keep), None)
            if victim is None:
                if keep is not None and self.used_bytes > self.budget_bytes:
                    note = (
                        f"model {self._name_of(keep)} takes {self.used_bytes / GIB:.2f} GiB, "
                        f"over the memory budget of {self.budget_bytes / GIB:.2f} GiB "
                        "(SDWORKER_MODEL_MEMORY_BUDGET); it runs alone"
                    )
                    log.warning(note)
                    self.warnings.append(note)
                return
            self.unload(victim)

    def unload(self, key: K) -> None:
        with self._lock:
            held = self._models.pop(key, None)
            if held is None:
                return
            log.info("unloading model %s to make room", self._name_of(key))
            if self._on_unload is not None:
                self._on_unload(key, held[0])

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._models.values())

    def resident(self) -> list[Resident]:
        """Loaded models, least recently used first."""
        with self._lock:
            return [Resident(self._name_of(k), size) for k, (_, size) in self._models.items()]

    def keys(self) -> list[K]:
        with self._lock:
            return list(self._models)

    def values(self) -> list[V]:
        with self._lock:
            return [value for value, _ in self._models.values()]


def module_bytes(*objects: Any) -> int:
    """Bytes of the parameters and buffers of the torch modules among `objects` (and of
    pipelines' components), each storage counted once: shared components (from_pipe,
    the refiner's VAE) are not counted twice."""
    seen: set[int] = set()
    total = 0
    for module in _modules(objects):
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in seen or storage.nbytes() == 0:
                continue
            seen.add(pointer)
            total += storage.nbytes()
    return total


def _modules(objects: tuple[Any, ...]) -> list[torch.nn.Module]:
    found: list[torch.nn.Module] = []
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            found.append(obj)
        elif hasattr(obj, "components"):
            found.extend(c for c in obj.components.values() if isinstance(c, torch.nn.Module))
    return found


def default_budget(device: torch.device) -> int:
    """auto: 85% of the GPU's memory (the rest for activations), half the host's
    memory on the CPU and MPS (which share it with everything else)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * 0.85)
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * page_size * 0.5)
