"""LoRA hotswap slots (engine/hotswap.py): a compiled UNet takes any LoRA set without
recompiling, and its images equal the plain adapter path (itself held to diffusers'
load_lora_weights + set_adapters in test_loras_engine.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdworker.engine.engine import Engine, EngineResult
from sdworker.engine.hotswap import HotswapLoras
from sdworker.engine.tiny import build_tiny_pipeline
from sdworker.jobs import JobSpec
from sdworker.loras import LoraCatalog, LoraLibrary
from sdworker.settings import Settings
from tests.conftest import max_pixel_difference
from tests.support.adapter_builders import (
    BENIGN_ADAPTER_WARNINGS,
    build_tiny_lora_for_sd15_like,
    build_tiny_lora_kohya,
    build_tiny_lora_peft,
)

pytestmark = [pytest.mark.filterwarnings(f) for f in BENIGN_ADAPTER_WARNINGS]

JOB: dict[str, Any] = {
    "prompt": "a lighthouse",
    "size": "64x64",
    "steps": 2,
    "seed": 11,
    "guidance_scale": 6.0,
}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hot-loras")
    pipe = build_tiny_pipeline("tiny-sdxl")
    build_tiny_lora_peft(pipe, folder / "alpha.safetensors", rank=4, seed=1)
    build_tiny_lora_kohya(pipe, folder / "kappa.safetensors", rank=8, seed=2, alpha=4)
    build_tiny_lora_peft(
        pipe, folder / "unet_only.safetensors", rank=2, seed=3, text_encoders=False
    )
    build_tiny_lora_peft(pipe, folder / "wide.safetensors", rank=16, seed=4)
    build_tiny_lora_for_sd15_like(pipe, folder / "sd15.safetensors")
    build_tiny_lora_peft(pipe, folder / "text_only.safetensors", rank=2, seed=6, targets=())
    # A LoRA on a layer outside the transformer blocks: the slots do not hold it.
    linear = pipe.unet.time_embedding.linear_1
    save_file(
        {
            "unet.time_embedding.linear_1.lora_A.weight": torch.randn(2, linear.in_features),
            "unet.time_embedding.linear_1.lora_B.weight": torch.randn(linear.out_features, 2),
        },
        str(folder / "offside.safetensors"),
    )
    return folder


def _engine(cache_dir: Path, lora_dir: Path, hotswap: str) -> Engine:
    settings = Settings(
        cache_dir=cache_dir, device="cpu", lora_dir=lora_dir, lora_hotswap=hotswap, lora_max_rank=8
    )
    return Engine(settings)


@pytest.fixture(scope="module")
def hot(cache_dir: Path, lora_dir: Path) -> Engine:
    return _engine(cache_dir, lora_dir, "on")


@pytest.fixture(scope="module")
def plain(cache_dir: Path, lora_dir: Path) -> Engine:
    return _engine(cache_dir, lora_dir, "off")


def _run(engine: Engine, **fields: Any) -> EngineResult:
    result = engine.run(JobSpec(**JOB, **fields))
    assert isinstance(result, EngineResult)
    return result


SETS = [
    [],
    [{"name": "alpha", "weight": 0.7}],
    [{"name": "kappa", "weight": 0.5}],
    [{"name": "alpha", "weight": 0.3}, {"name": "kappa", "weight": 1.2}],
    [{"name": "unet_only", "weight": 1.0}],
    [],
    [{"name": "kappa", "weight": 0.5}, {"name": "alpha", "weight": 0.7}],
]


def test_the_engine_uses_slots_when_asked(hot: Engine, plain: Engine) -> None:
    assert isinstance(hot.load().adapters, HotswapLoras)
    assert not isinstance(plain.load().adapters, HotswapLoras)


def test_every_set_in_turn_equals_the_plain_adapter_path(hot: Engine, plain: Engine) -> None:
    images = []
    for loras in SETS:
        got, want = _run(hot, loras=loras), _run(plain, loras=loras)
        assert got.warnings == want.warnings == []
        assert max_pixel_difference(got.images[0], want.images[0]) <= 1, loras
        images.append(np.asarray(got.images[0]))
    # and the sets are really different images (the test would pass on no-ops otherwise)
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[1], images[3])
    assert np.array_equal(images[0], images[5])  # none after LoRAs: the base image again


def test_more_loras_than_slots_are_skipped_with_a_warning(hot: Engine, plain: Engine) -> None:
    three = [{"name": "alpha"}, {"name": "kappa"}, {"name": "unet_only"}]
    result = _run(hot, loras=three)
    assert len(result.warnings) == 1
    assert "'unet_only'" in result.warnings[0]
    assert "SDWORKER_LORA_HOTSWAP_SLOTS" in result.warnings[0]
    two = _run(plain, loras=three[:2])
    assert max_pixel_difference(result.images[0], two.images[0]) <= 1


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("wide", "rank 16 is over SDWORKER_LORA_MAX_RANK=8"),
        ("sd15", "cross-attention 768, sd15"),
        ("offside", "skipped"),
    ],
)
def test_unusable_loras_are_skipped_and_the_next_job_is_fine(
    hot: Engine, plain: Engine, name: str, says: str
) -> None:
    skipped = _run(hot, loras=[{"name": name}, {"name": "alpha", "weight": 0.7}])
    assert len(skipped.warnings) == 1 and says in skipped.warnings[0]
    want = _run(plain, loras=[{"name": "alpha", "weight": 0.7}])
    assert max_pixel_difference(skipped.images[0], want.images[0]) <= 1
    after = _run(hot, loras=[{"name": "kappa", "weight": 0.5}])
    want_after = _run(plain, loras=[{"name": "kappa", "weight": 0.5}])
    assert max_pixel_difference(after.images[0], want_after.images[0]) <= 1


def test_a_text_only_lora_leaves_no_earlier_unet_lora_behind(hot: Engine, plain: Engine) -> None:
    _run(hot, loras=[{"name": "alpha", "weight": 0.7}])  # alpha now sits in slot 0
    got = _run(hot, loras=[{"name": "text_only", "weight": 1.0}])
    want = _run(plain, loras=[{"name": "text_only", "weight": 1.0}])
    assert got.warnings == []
    assert max_pixel_difference(got.images[0], want.images[0]) <= 1
    base = _run(plain)
    assert max_pixel_difference(got.images[0], base.images[0]) > 0  # the LoRA did apply


def test_a_failed_swap_keeps_the_jobs_other_loras(hot: Engine, plain: Engine) -> None:
    result = _run(hot, loras=[{"name": "alpha", "weight": 0.7}, {"name": "offside"}])
    assert len(result.warnings) == 1 and "'offside'" in result.warnings[0]
    assert [lora.name for lora in result.plan.loras] == ["alpha"]  # what really applied
    want = _run(plain, loras=[{"name": "alpha", "weight": 0.7}])
    assert max_pixel_difference(result.images[0], want.images[0]) <= 1


@pytest.fixture
def no_recompile() -> Iterator[None]:
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.config.error_on_recompile = False
    torch._dynamo.reset()


def test_a_compiled_unet_never_recompiles_across_lora_sets(
    lora_dir: Path, no_recompile: None
) -> None:
    """The UNet compiled with dynamo (eager backend: the same guards as inductor, without
    its compile time); after the first call, any recompile raises."""
    import torch._dynamo

    pipe = build_tiny_pipeline("tiny-sdxl")
    pipe.set_progress_bar_config(disable=True)
    slots = HotswapLoras(pipe, slots=2, max_rank=8, cache_size=4)
    library = LoraLibrary(LoraCatalog(lora_dir))
    pipe.unet.compile(backend="eager", dynamic=False)

    def image(loras: list[dict[str, Any]]) -> np.ndarray:
        spec = JobSpec(**JOB, loras=loras)
        assert slots.activate(tuple(library.resolve(spec.loras, None, lcm=False))).warnings == []
        out = pipe(
            "a lighthouse",
            num_inference_steps=2,
            width=64,
            height=64,
            generator=torch.Generator().manual_seed(0),
        )
        return np.asarray(out.images[0]).astype(int)

    base = image([])
    torch._dynamo.config.error_on_recompile = True
    first = image([{"name": "alpha", "weight": 0.7}])
    mixed = image([{"name": "kappa", "weight": 0.4}, {"name": "alpha", "weight": 0.2}])
    again = image([])
    assert np.abs(base - again).max() == 0
    assert np.abs(base - first).max() > 0 and np.abs(first - mixed).max() > 0
