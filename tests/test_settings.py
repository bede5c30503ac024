"""Settings: SDWORKER_* names, the aliases of the replaced deployments, normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from sdworker.settings import DEFAULT_MODEL, Settings

ALIASES = {
    "SDXL_MODEL_ROOT",
    "MODEL_ROOT",
    "SDXL_MODEL",
    "MODEL",
    "CUDA_DEVICE",
    "CUDA_DTYPE",
    "CUDA_ENABLE_XFORMERS",
    "CUDA_ATTENTION_SLICING",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray .env file and no real SDWORKER_* / alias variable can leak in."""
    monkeypatch.chdir(tmp_path)  # env_file=".env" is relative to the working directory
    for name in list(os.environ):
        # pydantic-settings matches names case-insensitively by default
        if name.upper().startswith("SDWORKER_") or name.upper() in ALIASES:
            monkeypatch.delenv(name)


def settings_error(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> str:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    return str(info.value)


def test_defaults() -> None:
    settings = Settings()
    assert settings.model_root is None
    assert settings.model == DEFAULT_MODEL == "tiny-sdxl"
    assert settings.device == "auto"
    assert settings.dtype == "auto"
    assert settings.enable_xformers is False
    assert settings.attention_slicing is False
    assert settings.max_num_images == 8
    assert settings.cache_dir == Path.home() / ".cache" / "sdworker"


@pytest.mark.parametrize("name", ["SDWORKER_MODEL_ROOT", "SDXL_MODEL_ROOT", "MODEL_ROOT"])
def test_model_root_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> None:
    monkeypatch.setenv(name, str(tmp_path / "models"))
    assert Settings().model_root == tmp_path / "models"


@pytest.mark.parametrize("name", ["SDWORKER_MODEL", "SDXL_MODEL", "MODEL"])
def test_model_names(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "sd_xl_base_1.0.safetensors")
    assert Settings().model == "sd_xl_base_1.0.safetensors"


def test_sdworker_name_wins_over_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_ROOT", "/from/model_root")
    monkeypatch.setenv("SDXL_MODEL_ROOT", "/from/sdxl_model_root")
    monkeypatch.setenv("SDWORKER_MODEL_ROOT", "/from/sdworker")
    monkeypatch.setenv("MODEL", "plain")
    monkeypatch.setenv("SDXL_MODEL", "sdxl")
    monkeypatch.setenv("SDWORKER_MODEL", "sdworker")
    monkeypatch.setenv("CUDA_DTYPE", "fp32")
    monkeypatch.setenv("SDWORKER_DTYPE", "bf16")
    monkeypatch.setenv("CUDA_DEVICE", "1")
    monkeypatch.setenv("SDWORKER_DEVICE", "cpu")
    settings = Settings()
    assert settings.model_root == Path("/from/sdworker")
    assert settings.model == "sdworker"
    assert settings.dtype == "bf16"
    assert settings.device == "cpu"


def test_first_listed_alias_wins_without_sdworker_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # AliasChoices order: SDWORKER_*, then SDXL_*, then the bare name.
    monkeypatch.setenv("MODEL_ROOT", "/from/model_root")
    monkeypatch.setenv("SDXL_MODEL_ROOT", "/from/sdxl_model_root")
    monkeypatch.setenv("MODEL", "plain")
    monkeypatch.setenv("SDXL_MODEL", "sdxl")
    settings = Settings()
    assert settings.model_root == Path("/from/sdxl_model_root")
    assert settings.model == "sdxl"


def test_env_file_in_working_directory_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / ".env").write_text("SDXL_MODEL=from-dotenv\nCUDA_DTYPE=bf16\n")
    settings = Settings()
    assert settings.model == "from-dotenv"
    assert settings.dtype == "bf16"
    # a real environment variable beats the .env file
    monkeypatch.setenv("SDXL_MODEL", "from-env")
    assert Settings().model == "from-env"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("fp32", "fp32"),
        ("auto", "auto"),
        ("float16", "fp16"),
        ("half", "fp16"),
        ("bfloat16", "bf16"),
        ("float32", "fp32"),
        (" FP16 ", "fp16"),
    ],
)
@pytest.mark.parametrize("name", ["CUDA_DTYPE", "SDWORKER_DTYPE"])
def test_dtype(monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    monkeypatch.setenv(name, value)
    assert Settings().dtype == expected


@pytest.mark.parametrize("value", ["fp8", "int8", "float64", ""])
def test_invalid_dtype_is_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = settings_error(monkeypatch, "CUDA_DTYPE", value)
    for allowed in ("auto", "fp16", "bf16", "fp32"):
        assert allowed in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "cuda:0"),
        ("3", "cuda:3"),
        ("cuda:1", "cuda:1"),
        ("CUDA:2", "cuda:2"),
        ("cuda", "cuda"),
        ("cpu", "cpu"),
        ("mps", "mps"),
        ("auto", "auto"),
        (" 1 ", "cuda:1"),
    ],
)
@pytest.mark.parametrize("name", ["CUDA_DEVICE", "SDWORKER_DEVICE"])
def test_device(monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str) -> None:
    monkeypatch.setenv(name, value)
    assert Settings().device == expected


def test_device_given_as_argument_is_normalised() -> None:
    assert Settings(device="0").device == "cuda:0"


@pytest.mark.parametrize("value", ["gpu", "cuda:", "cuda:x", "cuda0", "tpu:0", "-1"])
def test_invalid_device_is_rejected(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    message = settings_error(monkeypatch, "CUDA_DEVICE", value)
    assert "device must be auto, cpu, mps, cuda, cuda:N or N" in message
    assert repr(value.strip().lower()) in message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("1", True), ("TRUE", True), ("yes", True), ("false", False), ("0", False)],
)
@pytest.mark.parametrize(
    ("name", "attribute"),
    [
        ("CUDA_ENABLE_XFORMERS", "enable_xformers"),
        ("SDWORKER_ENABLE_XFORMERS", "enable_xformers"),
        ("CUDA_ATTENTION_SLICING", "attention_slicing"),
        ("SDWORKER_ATTENTION_SLICING", "attention_slicing"),
    ],
)
def test_booleans(
    monkeypatch: pytest.MonkeyPatch, name: str, attribute: str, value: str, expected: bool
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(Settings(), attribute) is expected


def test_invalid_boolean_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    settings_error(monkeypatch, "CUDA_ENABLE_XFORMERS", "sometimes")


def test_max_num_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDWORKER_MAX_NUM_IMAGES", "4")
    assert Settings().max_num_images == 4


@pytest.mark.parametrize("value", ["0", "65"])
def test_max_num_images_bounds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    settings_error(monkeypatch, "SDWORKER_MAX_NUM_IMAGES", value)
