"""Reading input images: local paths, data URIs, bare base64 and http(s) URLs."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdworker.errors import InputImageError
from sdworker.fetch import decode_image, load_image, read_image_bytes
from sdworker.netguard import AddressPolicy

MAX = 1024 * 1024
TIMEOUT = 5.0


def png_bytes(
    size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (200, 30, 60)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def assert_is_png(image: Image.Image, size: tuple[int, int] = (16, 12)) -> None:
    assert image.size == size
    assert image.convert("RGB").getpixel((0, 0)) == (200, 30, 60)


# The test server listens on loopback, which the default policy refuses (tests/test_netguard.py).
LOOPBACK_ALLOWED = AddressPolicy.from_list(["127.0.0.0/8"])


def read(ref: str, field: str = "image", max_bytes: int = MAX) -> bytes:
    return read_image_bytes(
        ref, field=field, max_bytes=max_bytes, timeout_s=TIMEOUT, policy=LOOPBACK_ALLOWED
    )


def load(ref: str, field: str = "image", max_bytes: int = MAX) -> Image.Image:
    return load_image(
        ref, field=field, max_bytes=max_bytes, timeout_s=TIMEOUT, policy=LOOPBACK_ALLOWED
    )


def load_error(ref: str, field: str = "image", max_bytes: int = MAX) -> InputImageError:
    with pytest.raises(InputImageError) as info:
        load(ref, field=field, max_bytes=max_bytes)
    error = info.value
    assert error.field == field
    assert error.message.startswith(f"{field}: ")
    assert error.code == "invalid_input_image"
    return error


# --------------------------------------------------------------------------- local files


def test_local_path(tmp_path: Path) -> None:
    path = tmp_path / "in.png"
    path.write_bytes(PNG)
    assert read(str(path)) == PNG
    assert_is_png(load(str(path)))
    assert_is_png(load(f"  {path}\n"))  # surrounding whitespace is ignored


def test_local_path_with_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "in.png").write_bytes(PNG)
    assert read("~/in.png") == PNG


@pytest.mark.parametrize("field", ["image", "mask"])
def test_missing_file(tmp_path: Path, field: str) -> None:
    missing = tmp_path / "nope" / "missing.png"
    error = load_error(str(missing), field=field)
    assert "does not exist" in error.message
    assert str(missing) in error.message


def test_missing_path_that_is_also_valid_base64_reports_missing_file() -> None:
    with pytest.raises(InputImageError, match="does not exist"):
        read("/srv/images/cat1")


def test_local_file_over_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(PNG)
    assert read(str(path), max_bytes=len(PNG)) == PNG  # the limit itself is allowed
    error = load_error(str(path), max_bytes=len(PNG) - 1)
    assert f"larger than {len(PNG) - 1} bytes" in error.message


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    load_error(str(tmp_path))


# --------------------------------------------------------------------------- data URI / base64


def test_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert read(uri) == PNG
    assert_is_png(load(uri))


def test_bare_base64() -> None:
    encoded = base64.b64encode(PNG).decode()
    assert read(encoded) == PNG
    assert_is_png(load(encoded))


def png_with_slash_in_base64() -> tuple[bytes, str]:
    for red in range(256):
        data = png_bytes(color=(red, 30, 60))
        encoded = base64.b64encode(data).decode()
        if "/" in encoded:
            return data, encoded
    raise AssertionError("no test image has '/' in its base64")


def test_bare_base64_containing_slashes() -> None:
    data, encoded = png_with_slash_in_base64()
    assert "/" in encoded
    assert read(encoded) == data
    assert load(encoded).size == (16, 12)


def long_base64_png() -> tuple[bytes, str]:
    """A valid PNG whose base64 has a run of more than 255 characters without '/'."""
    info = PngInfo()
    info.add_text("Comment", "A" * 600)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 60)).save(buffer, format="PNG", pnginfo=info)
    data = buffer.getvalue()
    return data, base64.b64encode(data).decode()


def test_bare_base64_with_long_run_without_slash() -> None:
    data, encoded = long_base64_png()
    assert len(encoded) < 4096
    assert max(len(part) for part in encoded.split("/")) > 255
    assert read(encoded) == data


def test_base64_over_max_bytes() -> None:
    encoded = base64.b64encode(PNG).decode()
    assert read(encoded, max_bytes=len(PNG)) == PNG
    error = load_error(encoded, max_bytes=len(PNG) - 1)
    assert "larger than" in error.message
    error = load_error("data:image/png;base64," + encoded, max_bytes=len(PNG) - 1)
    assert "larger than" in error.message


@pytest.mark.parametrize("junk", ["not an image!", "hello world", "%%%%", "ab"])
def test_junk_string(junk: str) -> None:
    error = load_error(junk, field="mask")
    assert "base64" in error.message


def test_bad_data_uri_payload() -> None:
    load_error("data:image/png;base64,***not base64***")


def test_base64_of_non_image() -> None:
    error = load_error(base64.b64encode(b"just some text, not a picture").decode())
    assert "not a PNG, JPEG or WEBP image" in error.message


# --------------------------------------------------------------------------- decode_image


def test_decode_image_returns_loaded_copy() -> None:
    image = decode_image(PNG, field="image")
    assert_is_png(image)
    assert image.tobytes() == Image.new("RGB", (16, 12), (200, 30, 60)).tobytes()


@pytest.mark.parametrize(
    "broken",
    [
        PNG[: len(PNG) // 2],  # truncated inside the pixel data
        PNG[:20],  # truncated header
        PNG[:16] + bytes([PNG[16] ^ 0xFF]) + PNG[17:],  # IHDR checksum mismatch
        b"",
        b"GIF89a but not really",
    ],
    ids=["truncated", "header-only", "bad-ihdr", "empty", "junk"],
)
@pytest.mark.parametrize("field", ["image", "mask"])
def test_decode_broken_png(broken: bytes, field: str) -> None:
    with pytest.raises(InputImageError) as info:
        decode_image(broken, field=field)
    assert info.value.field == field
    expected = "not a readable image" if broken[:4] == PNG[:4] else "not a PNG, JPEG or WEBP"
    assert info.value.message.startswith(f"{field}: {expected}")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_before_decoding(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format=fmt)
    with pytest.raises(InputImageError, match="not a PNG, JPEG or WEBP"):
        decode_image(buffer.getvalue(), field="image")


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_jpeg_and_webp_are_accepted(fmt: str) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format=fmt)
    assert decode_image(buffer.getvalue(), field="image").size == (8, 8)


def test_decode_corrupt_pixel_data() -> None:
    image = Image.new("RGB", (64, 64))
    image.putdata([(x * 3 % 256, y * 5 % 256, x * y % 256) for y in range(64) for x in range(64)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    start = data.index(b"IDAT") + 10
    corrupt = data[:start] + bytes(b ^ 0x55 for b in data[start : start + 50]) + data[start + 50 :]
    with pytest.raises(InputImageError) as info:
        decode_image(corrupt, field="image")
    assert info.value.field == "image"


def test_decode_pixel_bomb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 16x12 = 192 > 2 x 50
    with pytest.raises(InputImageError) as info:
        decode_image(PNG, field="image")
    assert info.value.field == "image"


# --------------------------------------------------------------------------- http(s) URLs

BIG = PNG + b"\0" * 5000  # a body larger than the small limits used below


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {"/img.png": PNG, "/big.png": BIG}
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path == "/chunked-big":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                piece = b"\0" * 1000
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        body = routes.get(self.path)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output quiet


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client hanging up on an oversized body is expected here


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


def test_url(server: str) -> None:
    assert read(f"{server}/img.png") == PNG
    assert_is_png(load(f"{server}/img.png"))


def test_url_follows_redirect(server: str) -> None:
    assert read(f"{server}/redirect") == PNG


@pytest.mark.parametrize("field", ["image", "mask"])
def test_url_404(server: str, field: str) -> None:
    error = load_error(f"{server}/missing.png", field=field)
    assert "404" in error.message
    assert "/missing.png" in error.message


def test_url_over_max_bytes(server: str) -> None:
    assert read(f"{server}/big.png", max_bytes=len(BIG)) == BIG
    error = load_error(f"{server}/big.png", max_bytes=len(BIG) - 1)
    assert "larger than" in error.message


def test_chunked_url_over_max_bytes(server: str) -> None:
    error = load_error(f"{server}/chunked-big", max_bytes=4096)
    assert "larger than 4096 bytes" in error.message


def test_unreachable_url() -> None:
    # port 9 (discard) on localhost: nothing listens there in a test environment
    error = load_error("http://127.0.0.1:9/img.png")
    assert "could not fetch" in error.message
