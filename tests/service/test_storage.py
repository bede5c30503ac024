"""Local storage and the asset key layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdworker.storage.base import (
    AssetNotFoundError,
    InvalidKeyError,
    content_type_of,
    image_key,
    thumbnail_key,
    validate_key,
)
from sdworker.storage.local import LocalStorage


def test_keys_follow_the_layout() -> None:
    assert image_key("alice", "01JOB", 2, "png") == "alice/01JOB/2.png"
    assert thumbnail_key("anonymous", "01JOB", 0) == "anonymous/01JOB/0.thumb.webp"


@pytest.mark.parametrize(
    "key",
    ["../etc/passwd", "a/../../b", "/abs/path.png", "a\\b.png", ".hidden/x", "a//b", "", "a/./b",
     "a/b/", "..", "a/..", "x" * 200, "%2e%2e/x", "a/b\x00.png"],
)  # fmt: skip
def test_unsafe_keys_are_rejected(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_put_get_delete_round_trip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://host:1/")
    url = storage.put("o/j/0.png", b"png-bytes", "image/png")
    assert url == "http://host:1/v1/assets/o/j/0.png"
    stored = storage.get("o/j/0.png")
    assert (stored.data, stored.content_type) == (b"png-bytes", "image/png")
    storage.put("o/j/0.png", b"again", "image/png")  # a re-run overwrites
    assert storage.get("o/j/0.png").data == b"again"
    assert not [p for p in (tmp_path / "o" / "j").iterdir() if p.name.startswith(".tmp")]
    storage.delete("o/j/0.png")
    with pytest.raises(AssetNotFoundError):
        storage.get("o/j/0.png")
    storage.delete("o/j/0.png")  # absent is fine


def test_a_folder_is_not_an_asset(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, "http://h")
    storage.put("o/j/0.png", b"x", "image/png")
    with pytest.raises(AssetNotFoundError):
        storage.get("o/j")


@pytest.mark.parametrize(
    ("key", "content_type"),
    [("a/0.png", "image/png"), ("a/0.thumb.webp", "image/webp"), ("a/0.jpeg", "image/jpeg"),
     ("a/0.bin", "application/octet-stream")],
)  # fmt: skip
def test_content_types(key: str, content_type: str) -> None:
    assert content_type_of(key) == content_type


def test_the_api_process_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from sdworker.api.app import create_app\n"
        "from sdworker.settings import Settings\n"
        f"app = create_app(Settings(_env_file=None, data_dir={str(tmp_path)!r}))\n"
        "with TestClient(app) as client:\n"
        "    r = client.post('/v1/jobs', json={'prompt': 'x', 'size': '64x64'})\n"
        "    assert r.status_code == 202, r.text\n"
        "    client.get('/status'); client.get('/metrics'); client.get('/v1/jobs')\n"
        "assert 'torch' not in sys.modules, 'the API imported torch'\n"
        "assert 'diffusers' not in sys.modules, 'the API imported diffusers'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
