"""The upscale task: Lanczos, hires fix (resample + img2img), ESRGAN-family models
loaded with spandrel (tiny random ESRGANs here), the pixel cap (engine and API), and
the errors that name their field."""

from __future__ import annotations

import base64
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from sdworker.engine.engine import Engine, EngineResult
from sdworker.errors import InvalidJobError, ModelLoadError
from sdworker.families import Task
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import gradient_image, max_pixel_difference
from tests.support.spandrel_support import build_tiny_esrgan, import_spandrel

INPUT_SIZE = (40, 24)
MODELS = ("tiny-x2", "tiny-x4")
# 40x24 x2 = 80x48 = 3840 pixels fits this cap (the smallest allowed); x4 does not.
SMALL_CAP = 64 * 64


@pytest.fixture(scope="module")
def spandrel() -> Any:
    return import_spandrel()


@pytest.fixture(scope="module")
def upscaler_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    build_tiny_esrgan(folder / "tiny-x2.safetensors", 2, seed=1)
    build_tiny_esrgan(folder / "tiny-x4.pth", 4, seed=2)
    (folder / "notes.txt").write_text("not an upscaler")
    return folder


@pytest.fixture(scope="module")
def upscale_settings(settings: Settings, upscaler_dir: Path) -> Settings:
    return settings.model_copy(update={"upscaler_dir": upscaler_dir})


@pytest.fixture(scope="module")
def upscale_engine(upscale_settings: Settings, spandrel: Any, tiny_folder: Path) -> Engine:
    return Engine(upscale_settings)


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Image.Image, str]:
    image = gradient_image(*INPUT_SIZE)
    path = tmp_path_factory.mktemp("upscale-input") / "in.png"
    image.save(path)
    return image, str(path)


def run(engine: Engine, spec: JobSpec, on_step: Any = None) -> EngineResult:
    result = engine.run(spec, on_step=on_step)
    assert isinstance(result, EngineResult)
    return result


def model_output(spandrel: Any, path: Path, image: Image.Image) -> Image.Image:
    """What the upscaler model itself makes of an image (float RGB in [0, 1], NCHW)."""
    model = spandrel.ModelLoader().load_from_file(str(path)).eval()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    with torch.inference_mode():
        output = model(pixels.permute(2, 0, 1)[None])[0]
    array = output.clamp(0, 1).permute(1, 2, 0).numpy()
    return Image.fromarray(np.round(array * 255.0).astype(np.uint8))


# -- Lanczos -----------------------------------------------------------------------------


@pytest.mark.parametrize(("factor", "size"), [(2, (80, 48)), (4, (160, 96))])
def test_lanczos_sizes_and_pixels(
    upscale_engine: Engine, picture: Any, factor: int, size: tuple[int, int]
) -> None:
    image, path = picture
    steps: list[int] = []
    result = run(
        upscale_engine,
        JobSpec(image=path, upscaler="lanczos", upscale_factor=factor),
        lambda s, _t: steps.append(s),
    )
    assert result.plan.task is Task.UPSCALE and result.plan.denoise_steps == 0
    assert [picture.size for picture in result.images] == [size]
    expected = image.resize(size, Image.Resampling.LANCZOS)
    assert max_pixel_difference(result.images[0], expected) == 0
    assert steps == []  # no denoising


def test_default_upscale_is_lanczos_x2(upscale_engine: Engine, picture: Any) -> None:
    image, path = picture
    result = run(upscale_engine, JobSpec(task="upscale", image=path))
    assert result.plan.upscale is not None
    assert (result.plan.upscale.upscaler, result.plan.upscale.factor) == ("lanczos", 2)
    expected = image.resize((80, 48), Image.Resampling.LANCZOS)
    assert max_pixel_difference(result.images[0], expected) == 0


@pytest.mark.parametrize("upscaler", ["lanczos", "tiny-x4"])
def test_one_image_upscalers_refuse_several_images(
    upscale_engine: Engine, picture: Any, upscaler: str
) -> None:
    with pytest.raises(InvalidJobError) as info:
        upscale_engine.plan(JobSpec(image=picture[1], upscaler=upscaler, num_images=2))
    assert info.value.field == "num_images"


# -- hires fix ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hires_run(
    upscale_engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> tuple[EngineResult, list[tuple[int, int]], Image.Image]:
    # 30x22 x2 = 60x44, which the VAE cannot take: cut down to multiples of 8.
    image = gradient_image(30, 22)
    path = tmp_path_factory.mktemp("hires") / "in.png"
    image.save(path)
    seen: list[tuple[int, int]] = []
    spec = JobSpec(prompt="sharp", image=str(path), upscaler="hires", steps=4, seed=3, num_images=2)
    return run(upscale_engine, spec, lambda s, t: seen.append((s, t))), seen, image


def test_hires_output_size_is_a_multiple_of_8(hires_run: Any) -> None:
    result, _, _ = hires_run
    assert [image.size for image in result.images] == [(56, 40), (56, 40)]
    assert result.seeds == [3, 4]


def test_hires_runs_the_img2img_pass(hires_run: Any) -> None:
    result, seen, image = hires_run
    # default hires strength 0.35 of 4 steps: int(1.4) = 1 denoising step
    assert result.plan.strength == 0.35
    assert seen == [(1, 1)]
    resampled = image.resize((60, 44), Image.Resampling.LANCZOS).resize(
        (56, 40), Image.Resampling.LANCZOS
    )
    assert max_pixel_difference(result.images[0], resampled) > 8  # the pass changed it
    assert max_pixel_difference(result.images[0], result.images[1]) > 0  # seeds differ


def test_hires_of_a_tiny_image_is_an_invalid_job(upscale_engine: Engine, tmp_path: Path) -> None:
    gradient_image(3, 3).save(tmp_path / "tiny.png")
    with pytest.raises(InvalidJobError):
        upscale_engine.run(JobSpec(image=str(tmp_path / "tiny.png"), upscaler="hires", steps=3))


# -- upscaler models (spandrel) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "file", "factor", "size"),
    [
        ("tiny-x2", "tiny-x2.safetensors", 2, (80, 48)),
        ("tiny-x4", "tiny-x4.pth", 4, (160, 96)),
    ],
)
def test_model_upscaler_at_its_own_scale(
    upscale_engine: Engine,
    upscaler_dir: Path,
    spandrel: Any,
    picture: Any,
    name: str,
    file: str,
    factor: int,
    size: tuple[int, int],
) -> None:
    image, path = picture
    result = run(upscale_engine, JobSpec(image=path, upscaler=name, upscale_factor=factor))
    assert result.images[0].size == size
    expected = model_output(spandrel, upscaler_dir / file, image)
    assert expected.size == size
    assert max_pixel_difference(result.images[0], expected) <= 1
    lanczos = image.resize(size, Image.Resampling.LANCZOS)
    assert max_pixel_difference(result.images[0], lanczos) > 8  # the model ran


def test_x4_model_asked_for_x2_is_resampled_to_2x(
    upscale_engine: Engine, upscaler_dir: Path, spandrel: Any, picture: Any
) -> None:
    image, path = picture
    result = run(upscale_engine, JobSpec(image=path, upscaler="tiny-x4", upscale_factor=2))
    assert result.images[0].size == (80, 48)
    four_times = model_output(spandrel, upscaler_dir / "tiny-x4.pth", image)
    expected = four_times.resize((80, 48), Image.Resampling.LANCZOS)
    assert max_pixel_difference(result.images[0], expected) <= 1


def test_unknown_upscaler_lists_the_known_ones(upscale_engine: Engine, picture: Any) -> None:
    with pytest.raises(InvalidJobError) as info:
        upscale_engine.plan(JobSpec(image=picture[1], upscaler="nope"))
    assert info.value.field == "upscaler"
    for word in ("'nope'", "lanczos", "hires", *MODELS):
        assert word in info.value.message
    assert "notes" not in info.value.message


def test_upscaler_names_cannot_leave_the_folder(upscale_engine: Engine, picture: Any) -> None:
    with pytest.raises(InvalidJobError) as info:
        upscale_engine.plan(JobSpec(image=picture[1], upscaler="../upscalers/tiny-x2"))
    assert info.value.field == "upscaler"


def test_unreadable_upscaler_file_is_a_model_load_error(
    settings: Settings, spandrel: Any, picture: Any, tmp_path: Path
) -> None:
    (tmp_path / "broken.pth").write_bytes(b"this is no checkpoint")
    engine = Engine(settings.model_copy(update={"upscaler_dir": tmp_path}))
    with pytest.raises(ModelLoadError) as info:
        engine.run(JobSpec(image=picture[1], upscaler="broken"))
    assert info.value.field == "upscaler"
    assert "broken.pth" in info.value.message


def test_without_spandrel_the_error_names_the_extra(
    upscale_settings: Settings,
    picture: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel -> ImportError
    engine = Engine(upscale_settings)  # fresh: no model loaded and kept yet
    with pytest.raises(ModelLoadError) as info:
        engine.run(JobSpec(image=picture[1], upscaler="tiny-x2"))
    assert info.value.field == "upscaler"
    assert "sdworker[upscale]" in info.value.message


# -- the pixel cap -----------------------------------------------------------------------


def test_output_over_the_pixel_cap_names_upscale_factor(
    upscale_settings: Settings, picture: Any
) -> None:
    engine = Engine(upscale_settings.model_copy(update={"upscale_max_pixels": SMALL_CAP}))
    with pytest.raises(InvalidJobError) as info:
        engine.run(JobSpec(image=picture[1], upscale_factor=4))
    assert info.value.field == "upscale_factor"
    assert "160x96" in info.value.message and str(SMALL_CAP) in info.value.message
    result = engine.run(JobSpec(image=picture[1], upscale_factor=2))  # 3840 pixels: fine
    assert isinstance(result, EngineResult) and result.images[0].size == (80, 48)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def api(upscale_settings: Settings, tmp_path: Path) -> Iterator[TestClient]:
    """The HTTP API in-process (no worker: accepted jobs stay queued)."""
    from sdworker.api.app import create_app

    settings = upscale_settings.model_copy(
        update={"data_dir": tmp_path / "data", "upscale_max_pixels": SMALL_CAP}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def test_api_refuses_an_upscale_over_the_cap_with_422(api: TestClient, picture: Any) -> None:
    image = png_base64(picture[0])
    response = api.post("/v1/jobs", json={"image": image, "upscale_factor": 4})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [entry["loc"][-1] for entry in detail] == ["upscale_factor"]
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing was queued
    accepted = api.post("/v1/jobs", json={"image": image, "upscale_factor": 2})
    assert accepted.status_code == 202, accepted.text


def test_api_lists_the_upscalers(api: TestClient) -> None:
    response = api.get("/v1/upscalers")
    assert response.status_code == 200
    assert response.json() == {
        "upscalers": ["lanczos", "hires", *MODELS],
        "factors": [2, 4],
        "max_pixels": SMALL_CAP,
    }


@pytest.mark.parametrize("name", MODELS)
def test_tiled_model_upscaling_equals_the_whole_image(
    upscale_settings: Settings, spandrel: Any, upscaler_dir: Path, picture: Any, name: str
) -> None:
    """Tiles of 16 px with 32 px of context (more than the tiny ESRGAN's receptive field)
    stitch to the whole-image output; the tile path really runs (6 tiles here)."""
    image, path = picture
    tiled = Engine(upscale_settings.model_copy(update={"upscale_tile_size": 16}))
    whole = Engine(upscale_settings.model_copy(update={"upscale_tile_size": 0}))
    factor = 2 if name.endswith("x2") else 4
    spec = JobSpec(image=path, upscaler=name, upscale_factor=factor)
    calls: list[tuple[int, ...]] = []
    model = tiled._upscalers.load(next(upscaler_dir.glob(f"{name}.*")))
    original = model.model.forward
    model.model.forward = lambda x: (calls.append(tuple(x.shape)), original(x))[1]
    try:
        ours = run(tiled, spec).images[0]
    finally:
        model.model.forward = original
    assert len(calls) == 6  # 40x24 in tiles of 16: 3 x 2
    reference = run(whole, spec).images[0]
    assert ours.size == reference.size == (image.width * factor, image.height * factor)
    assert max_pixel_difference(ours, reference) <= 1


def test_resampling_and_model_upscales_load_no_diffusion_model(
    upscale_settings: Settings, spandrel: Any, picture: Any
) -> None:
    engine = Engine(upscale_settings)
    _, path = picture
    run(engine, JobSpec(image=path, upscale_factor=2))
    run(engine, JobSpec(image=path, upscaler="tiny-x2", upscale_factor=2))
    assert engine.loaded_models() == []  # the SDXL weights were never loaded for these
    run(engine, JobSpec(image=path, upscaler="hires", upscale_factor=2, steps=3, prompt="x"))
    assert engine.loaded_models() == ["tiny-sdxl"]  # hires denoises with the model
