"""One storage contract, run on local disk and on an S3-compatible server over HTTP
(moto in server mode, reached with the real boto3 client), presigned downloads included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from sdworker.backends import build_storage
from sdworker.settings import Settings
from sdworker.storage.base import AssetNotFoundError, InvalidKeyError, Storage
from sdworker.storage.local import LocalStorage
from sdworker.storage.s3 import S3Storage
from tests.support.s3_server import CREDENTIALS, s3_endpoint


def _s3(endpoint: str, **extra: Any) -> S3Storage:
    return S3Storage(
        "outputs", prefix="sdw", region="us-east-1", endpoint_url=endpoint,
        access_key_id=CREDENTIALS["aws_access_key_id"],
        secret_access_key=CREDENTIALS["aws_secret_access_key"], **extra,
    )  # fmt: skip


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path, "http://api.test")
    return _s3(request.getfixturevalue("s3_endpoint"))


def test_put_get_overwrite_delete(storage: Storage) -> None:
    url = storage.put("alice/01J/0.png", b"\x89PNG first", "image/png")
    assert "alice/01J/0.png" in url
    stored = storage.get("alice/01J/0.png")
    assert (stored.data, stored.content_type) == (b"\x89PNG first", "image/png")
    storage.put("alice/01J/0.png", b"\x89PNG second", "image/png")
    assert storage.get("alice/01J/0.png").data == b"\x89PNG second"
    storage.delete("alice/01J/0.png")
    with pytest.raises(AssetNotFoundError):
        storage.get("alice/01J/0.png")


def test_thumbnail_content_type_is_kept(storage: Storage) -> None:
    storage.put("o/j/0.thumb.webp", b"RIFF....WEBP", "image/webp")
    assert storage.get("o/j/0.thumb.webp").content_type == "image/webp"


@pytest.mark.parametrize("key", ["../x.png", "/abs.png", "a/../../b.png"])
def test_unsafe_keys_never_reach_the_backend(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        storage.put(key, b"x", "image/png")


def test_presigned_url_downloads_the_object(s3_endpoint: str) -> None:
    storage = _s3(s3_endpoint, url_expiry_s=600)
    url = storage.put("bob/01J/1.png", b"\x89PNG bytes", "image/png")
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=600" in url
    reply = httpx.get(url)
    assert reply.status_code == 200 and reply.content == b"\x89PNG bytes"
    assert reply.headers["content-type"] == "image/png"


def test_cdn_base_url_replaces_presigning(s3_endpoint: str) -> None:
    storage = _s3(s3_endpoint, public_base_url="https://cdn.example.com/")
    assert storage.put("o/j/0.png", b"x", "image/png") == "https://cdn.example.com/sdw/o/j/0.png"


def test_settings_choose_s3_with_the_names_deployments_use(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, value in {
        "AWS_S3_BUCKET": "outputs", "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test-key", "AWS_SECRET_ACCESS_KEY": "test-secret",
        "SDWORKER_S3_ENDPOINT_URL": s3_endpoint, "CLOUDFRONT_URL": "https://d1.cloudfront.net",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert "test-secret" not in repr(settings)  # secrets stay out of reprs and logs
    storage = build_storage(settings)
    assert isinstance(storage, S3Storage)
    assert storage.put("o/j/0.png", b"x", "image/png") == "https://d1.cloudfront.net/o/j/0.png"
    assert storage.get("o/j/0.png").data == b"x"


__all__ = ["s3_endpoint"]  # the shared S3 server fixture
