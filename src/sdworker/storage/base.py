"""The Storage contract and the asset key layout shared by every backend."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from sdworker.errors import SdworkerError

_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_KEY_RE = re.compile(rf"^{_SEGMENT}(/{_SEGMENT}){{0,7}}$")

CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "mp4": "video/mp4",
    "bin": "application/octet-stream",
}


class InvalidKeyError(SdworkerError):
    """An asset key outside the allowed layout (e.g. a path traversal attempt)."""

    code = "invalid_key"


class AssetNotFoundError(SdworkerError):
    code = "not_found"


@dataclass(frozen=True)
class StoredObject:
    data: bytes
    content_type: str


def validate_key(key: str) -> str:
    """Keys are '/'-separated segments of [A-Za-z0-9_.-], none starting with '.':
    no '..', no absolute paths, no backslashes."""
    if not _KEY_RE.match(key) or ".." in key:
        raise InvalidKeyError(f"invalid asset key {key!r}", field="key")
    return key


def image_key(owner: str, job_id: str, index: int, extension: str) -> str:
    """`{owner}/{job_id}/{i}.{ext}`: deterministic, so a re-run overwrites."""
    return validate_key(f"{owner}/{job_id}/{index}.{extension}")


def video_key(owner: str, job_id: str, index: int) -> str:
    """`{owner}/{job_id}/{i}.mp4`; its poster is the image's `thumbnail_key`."""
    return image_key(owner, job_id, index, "mp4")


def thumbnail_key(owner: str, job_id: str, index: int) -> str:
    return validate_key(f"{owner}/{job_id}/{index}.thumb.webp")


def content_type_of(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


class Storage(Protocol):
    def put(self, key: str, data: bytes, content_type: str) -> str:
        """Store bytes under a key (overwriting) and return the URL clients fetch it at."""
        ...

    def get(self, key: str) -> StoredObject:
        """The stored bytes; AssetNotFoundError if absent."""
        ...

    def delete(self, key: str) -> None:
        """Remove a key; absent keys are fine."""
        ...

    def url(self, key: str) -> str:
        """The URL of a key."""
        ...
