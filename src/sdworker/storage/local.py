"""Local-disk storage: files under a root folder, served by the API at /v1/assets/{key}."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sdworker.storage.base import AssetNotFoundError, StoredObject, content_type_of, validate_key

ASSETS_ROUTE = "/v1/assets"


class LocalStorage:
    def __init__(self, root: Path, base_url: str) -> None:
        self._root = Path(root)
        self._root.mkdir(parents=True, exist_ok=True)
        self._base_url = base_url.rstrip("/")

    def _path(self, key: str) -> Path:
        return self._root / validate_key(key)

    def put(self, key: str, data: bytes, content_type: str) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file, a re-run overwrites whole.
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return self.url(key)

    def get(self, key: str) -> StoredObject:
        path = self._path(key)
        try:
            return StoredObject(path.read_bytes(), content_type_of(key))
        except (FileNotFoundError, IsADirectoryError):
            raise AssetNotFoundError(f"no asset {key!r}", field="key") from None

    def file_path(self, key: str) -> Path:
        """The file of a stored key (for range-capable serving); AssetNotFoundError if none."""
        path = self._path(key)
        if not path.is_file():
            raise AssetNotFoundError(f"no asset {key!r}", field="key")
        return path

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def url(self, key: str) -> str:
        return f"{self._base_url}{ASSETS_ROUTE}/{validate_key(key)}"
