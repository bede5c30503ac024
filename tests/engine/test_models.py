"""Finding and loading models: tiny, diffusers folder, single file (offline), hub id."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sdworker.engine.engine import Engine
from sdworker.engine.ldm_layout import save_single_file
from sdworker.engine.models import SourceKind, family_from_keys, resolve_model
from sdworker.errors import ModelLoadError, ModelNotFoundError
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import max_pixel_difference

SPEC = {"prompt": "a castle", "size": "64x64", "steps": 3, "seed": 11, "num_images": 2}


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_folder: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_folder)


@pytest.fixture(scope="module")
def tiny_config(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's configs without its weights, like the shipped configs/sdxl-base:
    a loader that fell back to weights in the config folder would fail here."""
    target = tmp_path_factory.mktemp("tiny-config") / "tiny-sdxl"
    shutil.copytree(tiny_folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


@pytest.fixture(scope="module")
def folder_images(settings: Settings, tiny_folder: Path) -> list[Any]:
    result: Any = Engine(settings.model_copy(update={"model": str(tiny_folder)})).run(
        JobSpec(**SPEC)
    )
    return list(result.images)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_offline_and_matches_the_folder(
    settings: Settings,
    tiny_pipeline: Any,
    tiny_config: Path,
    folder_images: list[Any],
    tmp_path: Path,
    suffix: str,
    no_network: None,
) -> None:
    path = save_single_file(tiny_pipeline, tmp_path / f"tiny{suffix}")
    source = resolve_model(str(path), settings)
    assert (source.kind, source.family) == (SourceKind.SINGLE_FILE, "sdxl")
    engine = Engine(
        settings.model_copy(update={"model": str(path), "model_config_dir": tiny_config})
    )
    result: Any = engine.run(JobSpec(**SPEC))
    for mine, expected in zip(result.images, folder_images, strict=True):
        assert max_pixel_difference(mine, expected) <= 1


def test_name_under_the_model_root_with_or_without_suffix(
    settings: Settings, tiny_pipeline: Any, tmp_path: Path
) -> None:
    save_single_file(tiny_pipeline, tmp_path / "lustify.safetensors")
    rooted = settings.model_copy(update={"model_root": tmp_path})
    for name in ("lustify.safetensors", "lustify"):
        source = resolve_model(name, rooted)
        assert source.location == str(tmp_path / "lustify.safetensors")


def test_folder_model_is_found_under_the_root(settings: Settings, tiny_folder: Path) -> None:
    rooted = settings.model_copy(update={"model_root": tiny_folder.parent})
    source = resolve_model(tiny_folder.name, rooted)
    assert (source.kind, source.family, source.location) == (
        SourceKind.FOLDER,
        "sdxl",
        str(tiny_folder),
    )


def test_missing_model_lists_the_paths_tried(settings: Settings, tmp_path: Path) -> None:
    rooted = settings.model_copy(update={"model_root": tmp_path})
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("nothing-here", rooted)
    message = info.value.message
    for tried in ("nothing-here.safetensors", "nothing-here.ckpt", str(tmp_path / "nothing-here")):
        assert tried in message


def test_corrupt_safetensors_is_reported(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError, match=r"not a readable .safetensors checkpoint"):
        resolve_model(str(bad), settings)


def test_corrupt_ckpt_is_reported(settings: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ModelLoadError, match=r"not a readable .ckpt checkpoint"):
        resolve_model(str(bad), settings)


def test_non_stable_diffusion_checkpoint_is_reported(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "classifier.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelLoadError, match=r"not a Stable Diffusion checkpoint.*fc.weight"):
        resolve_model(str(path), settings)


def test_a_refiner_as_the_model_is_refused_with_what_to_do(settings: Settings) -> None:
    engine = Engine(settings.model_copy(update={"model": "tiny-sdxl-refiner"}))
    with pytest.raises(ModelLoadError, match=r"sdxl-refiner model.*SDWORKER_REFINER"):
        engine.run(JobSpec(prompt="x"))


def test_checkpoint_with_another_architecture_names_the_config_setting(
    settings: Settings, tiny_pipeline: Any, tmp_path: Path
) -> None:
    path = save_single_file(tiny_pipeline, tmp_path / "tiny.safetensors")
    engine = Engine(settings.model_copy(update={"model": str(path)}))  # shipped full-size configs
    with pytest.raises(ModelLoadError, match=r"SDWORKER_MODEL_CONFIG"):
        engine.load()


def test_folder_without_model_index_is_reported(settings: Settings, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"without model_index.json"):
        resolve_model(str(tmp_path / "empty"), settings)


def test_hub_id_offline_and_not_cached_names_the_id(settings: Settings) -> None:
    with pytest.raises(ModelLoadError, match=r"hub model 'nobody/not-cached'.*HF_HUB_OFFLINE"):
        resolve_model("nobody/not-cached", settings)


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.x", "conditioner.embedders.1.model.ln_final.weight"], "sdxl"),
        (
            ["model.diffusion_model.x", "conditioner.embedders.0.model.ln_final.weight"],
            "sdxl-refiner",
        ),
        (["model.diffusion_model.x", "cond_stage_model.transformer.text_model.x"], "sd15"),
        (["model.diffusion_model.x", "cond_stage_model.model.ln_final.weight"], "sd21"),
        (["model.diffusion_model.joint_blocks.0.x"], "sd3"),
        (["patch_embedding.weight", "blocks.0.self_attn.q.weight"], "wan-t2v"),
        (["fc.weight"], None),
    ],
)
def test_family_from_checkpoint_keys(keys: list[str], family: str | None) -> None:
    assert family_from_keys(keys) == family


def test_hub_id_is_served_from_the_local_hub_cache(tiny_folder: Path, tmp_path: Path) -> None:
    """A model already in the Hugging Face cache loads with HF_HUB_OFFLINE=1 (a fresh
    process, since huggingface_hub reads its cache location at import)."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-sdxl" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "hub.png"
    command = [sys.executable, "-m", "sdworker", "generate", "x", "--model", "acme/tiny-sdxl"]
    done = subprocess.run(
        [*command, "--size", "64x64", "--steps", "2", "--seed", "3", "-o", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "seed=3" in done.stdout
