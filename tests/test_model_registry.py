"""The model registry setting (SDWORKER_MODELS) and which model a job runs on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdworker.jobs import JobSpec
from sdworker.model_registry import (
    ModelRegistryError,
    default_model_for,
    load_model_registry,
    parse_memory_size,
)
from sdworker.settings import Settings


def _settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


def test_no_registry_is_empty() -> None:
    assert load_model_registry(_settings()) == {}


def test_toml_registry(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.sd15]\nsource = "tiny-sd15"\nsteps = 12\nscheduler = "K_EULER"\n'
        '[models.turbo]\nsource = "tiny-sdxl"\nvariant = "turbo"\nguidance_scale = 0.0\n'
    )
    registry = load_model_registry(_settings(models=str(path)))
    assert registry["sd15"].source == "tiny-sd15" and registry["sd15"].steps == 12
    assert registry["sd15"].scheduler == "euler"  # canonical name
    assert registry["turbo"].variant == "turbo" and registry["turbo"].guidance_scale == 0.0


def test_yaml_and_inline_json(tmp_path: Path) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  video:\n    source: tiny-wan\n    family: wan-t2v\n")
    assert load_model_registry(_settings(models=str(path)))["video"].family == "wan-t2v"
    inline = json.dumps({"a": {"source": "tiny-sd3"}, "b": "tiny-sd15"})
    registry = load_model_registry(_settings(models=inline))
    assert registry["a"].source == "tiny-sd3" and registry["b"].source == "tiny-sd15"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": {"source": "x", "steps": 0}}', "model 'a': steps"),
        ('{"a": {"source": "x", "family": "sd9"}}', "model 'a': family"),
        ('{"a": {"source": "x", "scheduler": "nope"}}', "unknown scheduler 'nope'"),
        ('{"a": {"source": "x", "colour": 1}}', "model 'a': colour"),
        ('{"a": {', "JSONDecodeError"),
        ("/no/such/models.toml", "FileNotFoundError"),
    ],
)
def test_unusable_registry_names_the_entry_and_field(text: str, expected: str) -> None:
    with pytest.raises(ModelRegistryError) as caught:
        load_model_registry(_settings(models=text))
    assert expected in caught.value.message and caught.value.field == "models"


def test_the_video_model_flag_registers_it() -> None:
    off = _settings(video_model="tiny-wan")
    assert load_model_registry(off) == {}
    on = _settings(video_model="tiny-wan", register_video_model=True)
    assert load_model_registry(on)["tiny-wan"].family == "wan-t2v"


def test_download_wan2_model_is_the_replaced_endpoints_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DOWNLOAD_WAN2_MODEL", "true")
    assert Settings(_env_file=None).register_video_model


def test_which_model_a_job_runs_on() -> None:
    settings = _settings(model="tiny-sdxl", video_model="tiny-wan", register_video_model=True)
    assert default_model_for(JobSpec(prompt="x"), settings) == "tiny-sdxl"
    assert default_model_for(JobSpec(prompt="x", model="m"), settings) == "m"
    assert default_model_for(JobSpec(prompt="x", task="text2video"), settings) == "tiny-wan"
    assert default_model_for(JobSpec(prompt="x", num_frames=17), settings) == "tiny-wan"
    off = _settings(model="tiny-sdxl")
    assert default_model_for(JobSpec(prompt="x", task="text2video"), off) == "tiny-sdxl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("auto", None),
        ("1024", 1024),
        ("2KB", 2048),
        ("1.5GiB", int(1.5 * 1024**3)),
        ("20gb", 20 * 1024**3),
    ],
)
def test_memory_sizes(text: str, expected: int | None) -> None:
    assert parse_memory_size(text) == expected


def test_a_bad_memory_size_says_what_to_write() -> None:
    with pytest.raises(ModelRegistryError, match="20GB"):
        parse_memory_size("lots")
