"""Reading user-supplied images: local paths, http(s) URLs, data URIs and bare base64.

Sizes are capped before decoding. Network address filtering (SSRF guard) for URLs is
not here yet; until it is, only run the URL path for trusted callers.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError

from sdworker.errors import InputImageError


def _read_url(url: str, field: str, max_bytes: int, timeout_s: float) -> bytes:
    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            if response.status_code != 200:
                raise InputImageError(
                    f"{field}: {url} answered HTTP {response.status_code}", field=field
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise InputImageError(
                        f"{field}: {url} is larger than {max_bytes} bytes", field=field
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InputImageError(f"{field}: could not fetch {url}: {exc}", field=field) from exc


def _read_base64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputImageError(
            f"{field}: not an existing file, an http(s) URL, a data URI or base64 image data",
            field=field,
        ) from exc


# Leading bytes of the formats Pillow is asked to read; used to tell base64 image data
# from a path that happens to be valid base64 too ("/srv/img/cat1").
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def _existing_file(ref: str) -> Path | None:
    if len(ref) > 4096:
        return None
    try:
        path = Path(ref).expanduser()
        return path if path.is_file() else None
    except (OSError, ValueError):  # e.g. a long base64 string is "File name too long"
        return None


def _looks_like_path(ref: str) -> bool:
    return len(ref) < 4096 and (
        ref.startswith(("/", "./", "../", "~"))
        or ref.lower().endswith((".png", ".jpg", ".jpeg", ".webp"))
    )


def read_image_bytes(ref: str, *, field: str, max_bytes: int, timeout_s: float) -> bytes:
    """The raw bytes an image reference points at, capped at max_bytes."""
    ref = ref.strip()
    if ref.startswith(("http://", "https://")):
        return _read_url(ref, field, max_bytes, timeout_s)
    path = _existing_file(ref)
    if path is not None:
        if path.stat().st_size > max_bytes:
            raise InputImageError(f"{field}: {path} is larger than {max_bytes} bytes", field=field)
        return path.read_bytes()
    if ref.startswith("data:"):
        data = _read_base64(ref.partition(",")[2], field)
    else:
        try:
            data = _read_base64(ref, field)
        except InputImageError:
            data = b""
        if not data.startswith(_IMAGE_SIGNATURES):
            if _looks_like_path(ref):
                raise InputImageError(f"{field}: file {ref} does not exist", field=field)
            if not data:
                raise InputImageError(
                    f"{field}: not an existing file, an http(s) URL, a data URI or base64 "
                    "image data",
                    field=field,
                )
    if len(data) > max_bytes:
        raise InputImageError(f"{field}: image is larger than {max_bytes} bytes", field=field)
    return data


def decode_image(data: bytes, *, field: str) -> Image.Image:
    """Decode image bytes fully (so truncation is caught now), guarding against pixel bombs."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"{field}: not a readable image ({exc})", field=field) from exc


def load_image(ref: str, *, field: str, max_bytes: int, timeout_s: float) -> Image.Image:
    """Read and decode an image reference; errors name the request field."""
    data = read_image_bytes(ref, field=field, max_bytes=max_bytes, timeout_s=timeout_s)
    return decode_image(data, field=field)


def require_same_size(image: Image.Image, mask: Image.Image) -> None:
    """An inpaint mask must cover its image exactly."""
    if mask.size != image.size:
        raise InputImageError(
            f"mask: is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; they must be the same size",
            field="mask",
        )
