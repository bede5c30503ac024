"""Reading user-supplied images safely: http(s) URLs (address-checked, see netguard),
data URIs, bare base64 and, for local use only, file paths.

Every source is capped in size (with or without Content-Length) and time, and must be a
PNG, JPEG or WEBP by its leading bytes before Pillow decodes it; Pillow's
decompression-bomb limit stays on and oversized pixel counts are refused.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
from PIL import Image, UnidentifiedImageError

from sdworker.errors import InputImageError
from sdworker.netguard import AddressPolicy, UnsafeUrlError, request_extensions

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 3
# Input formats accepted anywhere (URL, base64, file): checked before any decoder runs.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_INPUT_PIXELS = 40_000_000  # well above any generation size, far below a pixel bomb


def _read_url(
    url: str, field: str, max_bytes: int, timeout_s: float, policy: AddressPolicy
) -> bytes:
    """GET with every hop checked by the address policy and pinned to the checked
    address; redirects followed by hand (at most 3), each target checked again."""
    deadline = time.monotonic() + timeout_s
    shown = url if len(url) <= 200 else url[:200] + "..."
    # trust_env off: a proxy from the environment would bypass the address pinning.
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = policy.resolve(url)
            except UnsafeUrlError as exc:
                where = url if len(url) <= 200 else url[:200] + "..."
                raise InputImageError(f"{field}: refused {where}: {exc}", field=field) from None
            try:
                with client.stream(
                    "GET",
                    target.url,
                    headers={"Host": target.host_header},
                    extensions=request_extensions(target),
                ) as response:
                    if response.status_code in REDIRECT_STATUSES:
                        location = response.headers.get("location", "")
                        if not location:
                            break
                        url = urljoin(url, location)
                        continue
                    if response.status_code != 200:
                        raise InputImageError(
                            f"{field}: {shown} answered HTTP {response.status_code}", field=field
                        )
                    return _read_capped(response, field, shown, max_bytes, deadline)
            except httpx.HTTPError as exc:
                raise InputImageError(
                    f"{field}: could not fetch {shown}: {type(exc).__name__}", field=field
                ) from exc
    raise InputImageError(f"{field}: {shown} redirects too often", field=field)


def _read_capped(
    response: httpx.Response, field: str, shown: str, max_bytes: int, deadline: float
) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise InputImageError(f"{field}: {shown} is larger than {max_bytes} bytes", field=field)
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise InputImageError(f"{field}: {shown} is larger than {max_bytes} bytes", field=field)
        if time.monotonic() > deadline:
            raise InputImageError(f"{field}: {shown} took too long to download", field=field)
        chunks.append(chunk)
    return b"".join(chunks)


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


def read_image_bytes(
    ref: str,
    *,
    field: str,
    max_bytes: int,
    timeout_s: float,
    policy: AddressPolicy | None = None,
    allow_paths: bool = True,
) -> bytes:
    """The raw bytes an image reference points at, capped at max_bytes. URLs must pass
    `policy` (default: public addresses only); paths only with allow_paths."""
    ref = ref.strip()
    if "://" in ref[:16]:
        return _read_url(ref, field, max_bytes, timeout_s, policy or AddressPolicy())
    path = _existing_file(ref) if allow_paths else None
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
                problem = "does not exist" if allow_paths else "is a path; paths are not accepted"
                raise InputImageError(
                    f"{field}: {ref} {problem}; send an http(s) URL, a data URI or base64",
                    field=field,
                )
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
    """Decode PNG/JPEG/WEBP bytes fully (so truncation is caught now); anything else, a
    pixel bomb or a corrupt file is an InputImageError naming the field."""
    is_webp = data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if not (data.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or is_webp):
        raise InputImageError(
            f"{field}: not a PNG, JPEG or WEBP image (the formats accepted)", field=field
        )
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
            if image.width * image.height > MAX_INPUT_PIXELS:
                raise InputImageError(
                    f"{field}: {image.width}x{image.height} is more than {MAX_INPUT_PIXELS} pixels",
                    field=field,
                )
            image.load()
            return image.copy()
    except UnidentifiedImageError as exc:
        raise InputImageError(f"{field}: not a readable image", field=field) from exc
    except (OSError, Image.DecompressionBombError) as exc:
        raise InputImageError(f"{field}: not a readable image ({exc})", field=field) from exc


def load_image(
    ref: str,
    *,
    field: str,
    max_bytes: int,
    timeout_s: float,
    policy: AddressPolicy | None = None,
    allow_paths: bool = True,
) -> Image.Image:
    """Read and decode an image reference; errors name the request field."""
    data = read_image_bytes(
        ref,
        field=field,
        max_bytes=max_bytes,
        timeout_s=timeout_s,
        policy=policy,
        allow_paths=allow_paths,
    )
    return decode_image(data, field=field)


def require_same_size(image: Image.Image, mask: Image.Image) -> None:
    """An inpaint mask must cover its image exactly."""
    if mask.size != image.size:
        raise InputImageError(
            f"mask: is {mask.size[0]}x{mask.size[1]} but the image is "
            f"{image.size[0]}x{image.size[1]}; they must be the same size",
            field="mask",
        )
