"""The loaded-model registry: load once, least recently used out under a memory budget."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from sdworker.engine.registry import LoadedModels, module_bytes


class _Loader:
    """Counts loads; each model's size is its name's number (in bytes)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[str] = []
        self.unloaded: list[str] = []
        self.delay_s = delay_s
        self._lock = threading.Lock()

    def load(self, key: str) -> dict[str, int]:
        with self._lock:
            self.calls.append(key)
        time.sleep(self.delay_s)
        return {"size": int(key.split("-")[1])}

    def registry(
        self, budget: int | None, estimate: bool = False
    ) -> LoadedModels[str, dict[str, int]]:
        return LoadedModels(
            self.load,
            lambda model: model["size"],
            budget_bytes=budget,
            estimate=(lambda key: int(key.split("-")[1])) if estimate else (lambda key: None),
            on_unload=lambda key, _model: self.unloaded.append(key),
        )


def test_a_loaded_model_is_reused() -> None:
    loader = _Loader()
    models = loader.registry(budget=None)
    first, fresh = models.get("a-10")
    again, fresh_again = models.get("a-10")
    assert first is again and fresh and not fresh_again
    assert loader.calls == ["a-10"] and models.loads == 1


def test_concurrent_demand_loads_a_model_once() -> None:
    loader = _Loader(delay_s=0.2)
    models = loader.registry(budget=None)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(models.get("a-10")[0])) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loader.calls == ["a-10"]
    assert len(got) == 8 and all(model is got[0] for model in got)


def test_two_models_fit_and_the_least_recently_used_goes_first() -> None:
    loader = _Loader()
    models = loader.registry(budget=25)
    models.get("a-10")
    models.get("b-10")
    assert [r.name for r in models.resident()] == ["a-10", "b-10"] and models.used_bytes == 20
    models.get("a-10")  # a is now the most recent
    models.get("c-10")  # 30 > 25: b (least recently used) goes
    assert loader.unloaded == ["b-10"]
    assert [r.name for r in models.resident()] == ["a-10", "c-10"]


def test_room_is_made_before_loading_when_the_size_is_known() -> None:
    loader = _Loader()
    models = loader.registry(budget=25, estimate=True)
    models.get("a-10")
    order: list[str] = []
    models._on_unload = lambda key, _m: order.append(f"unload {key}")
    original = models._load
    models._load = lambda key: (order.append(f"load {key}"), original(key))[1]
    models.get("b-20")
    assert order == ["unload a-10", "load b-20"]  # never both in memory at once


def test_a_model_over_the_budget_runs_alone_with_a_warning() -> None:
    loader = _Loader()
    models = loader.registry(budget=15)
    models.get("a-10")
    models.get("b-40")
    assert [r.name for r in models.resident()] == ["b-40"]
    assert "over the memory budget" in models.warnings[-1]


def test_no_budget_keeps_everything() -> None:
    loader = _Loader()
    models = loader.registry(budget=None)
    for name in ("a-10", "b-10", "c-10"):
        models.get(name)
    assert loader.unloaded == [] and len(models.resident()) == 3


def test_module_bytes_counts_shared_weights_once() -> None:
    shared = torch.nn.Linear(4, 4)  # 16 + 4 floats
    other = torch.nn.Linear(2, 2)  # 4 + 2 floats

    class Pipe:
        def __init__(self) -> None:
            self.components = {"a": shared, "b": shared, "c": other, "name": "not a module"}

    assert module_bytes(Pipe(), shared, None) == (20 + 6) * 4


def test_one_engine_serves_two_families_and_evicts_by_budget(settings: Any) -> None:
    from sdworker.engine.engine import Engine, EngineResult
    from sdworker.jobs import JobSpec

    engine = Engine(settings)
    spec = {"prompt": "x", "size": "64x64", "steps": 2, "seed": 1}
    for name in ("tiny-sd15", "tiny-sd3"):
        result = engine.run(JobSpec(model=name, **spec))
        assert isinstance(result, EngineResult) and result.model == name
    assert engine.loaded_models() == ["tiny-sd15", "tiny-sd3"]
    sizes = {r.name: r.bytes for r in engine.models.resident()}
    assert all(size > 0 for size in sizes.values())
    # A budget that holds one of them: the least recently used one goes.
    tight = Engine(
        settings.model_copy(update={"model_memory_budget": str(max(sizes.values()) + 1)})
    )
    tight.run(JobSpec(model="tiny-sd15", **spec))
    tight.run(JobSpec(model="tiny-sd3", **spec))
    assert tight.loaded_models() == ["tiny-sd3"]
    again = tight.run(JobSpec(model="tiny-sd15", **spec))
    assert isinstance(again, EngineResult) and again.timings["load_s"] > 0  # reloaded
    assert tight.loaded_models() == ["tiny-sd15"] and tight.models.loads == 3


def test_the_engine_loads_a_model_once_under_concurrent_demand(settings: Any) -> None:
    from sdworker.engine.engine import Engine

    engine = Engine(settings)
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(engine.load("tiny-sd21"))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert engine.models.loads == 1 and all(model is got[0] for model in got)


def test_the_size_estimate_before_loading_counts_the_weight_files(settings: Any) -> None:
    from sdworker.engine.engine import Engine
    from sdworker.engine.models import estimate_weight_bytes

    engine = Engine(settings)
    source = engine.source("tiny-sd15")
    estimate = estimate_weight_bytes(source, settings, 4)
    engine.load("tiny-sd15")
    measured = engine.models.resident()[0].bytes
    assert estimate is not None and abs(estimate - measured) <= 0.05 * measured
