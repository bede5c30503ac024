"""Family detection from diffusers folders and single files, and single-file loading of
SD 1.x/2.x checkpoints in the original layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdworker.engine.engine import Engine, EngineResult
from sdworker.engine.ldm_layout import save_single_file
from sdworker.engine.models import SourceKind, folder_family, resolve_model
from sdworker.engine.tiny import TINY_FAMILIES, build_tiny_pipeline, ensure_tiny_model
from sdworker.errors import ModelLoadError
from sdworker.jobs import JobSpec
from sdworker.settings import Settings
from tests.conftest import max_pixel_difference

SPEC = {"prompt": "a lighthouse", "size": "64x64", "steps": 3, "seed": 21}


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_every_tiny_folder_is_detected_as_its_family(cache_dir: Path, name: str) -> None:
    assert folder_family(ensure_tiny_model(name, cache_dir)) == TINY_FAMILIES[name]


def test_sd2_is_told_from_sd1_by_the_unet(cache_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "renamed-sd2"
    shutil.copytree(ensure_tiny_model("tiny-sd21", cache_dir), folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"  # the same class as SD 1.x
    assert folder_family(folder) == "sd21"


@pytest.mark.parametrize(("name", "family"), [("tiny-sd15", "sd15"), ("tiny-sd21", "sd21")])
def test_sd1_and_sd2_single_files_are_detected_and_match_the_folder(
    settings: Settings, cache_dir: Path, tmp_path: Path, name: str, family: str
) -> None:
    folder = ensure_tiny_model(name, cache_dir)
    path = save_single_file(build_tiny_pipeline(name), tmp_path / f"{name}.safetensors")
    source = resolve_model(str(path), settings)
    assert (source.kind, source.family) == (SourceKind.SINGLE_FILE, family)
    from_file = Engine(settings.model_copy(update={"model": str(path), "model_config_dir": folder}))
    from_folder = Engine(settings.model_copy(update={"model": name}))
    mine, theirs = from_file.run(JobSpec(**SPEC)), from_folder.run(JobSpec(**SPEC))
    assert isinstance(mine, EngineResult) and isinstance(theirs, EngineResult)
    assert mine.family == family
    assert max_pixel_difference(mine.images[0], theirs.images[0]) <= 1


def test_a_registry_entry_carries_its_own_config_folder(
    settings: Settings, cache_dir: Path, tmp_path: Path
) -> None:
    folder = ensure_tiny_model("tiny-sd15", cache_dir)
    path = save_single_file(build_tiny_pipeline("tiny-sd15"), tmp_path / "mine.safetensors")
    registry = json.dumps({"mine": {"source": str(path), "config_dir": str(folder)}})
    engine = Engine(settings.model_copy(update={"models": registry}))
    result = engine.run(JobSpec(model="mine", **SPEC))
    assert isinstance(result, EngineResult) and result.family == "sd15"


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
        (["patch_embedding.weight", "blocks.0.self_attn.q.weight"], "wan-t2v"),
    ],
)
def test_sd3_and_wan_single_files_are_detected(
    settings: Settings, tmp_path: Path, keys: list[str], family: str
) -> None:
    path = tmp_path / f"{family}.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(path))
    assert resolve_model(str(path), settings).family == family


def test_a_wan_single_file_says_to_use_the_folder(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "wan.safetensors"
    save_file(
        {"patch_embedding.weight": torch.zeros(1), "blocks.0.self_attn.q.weight": torch.zeros(1)},
        str(path),
    )
    engine = Engine(settings.model_copy(update={"model": str(path)}))
    with pytest.raises(ModelLoadError, match="diffusers folder or hub id"):
        engine.load()


def test_unknown_pipeline_class_lists_the_served_ones(tmp_path: Path) -> None:
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(ModelLoadError, match=r"FluxPipeline.*StableDiffusion3Pipeline"):
        folder_family(folder)
