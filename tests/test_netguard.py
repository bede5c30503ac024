"""SSRF guard: user URLs never reach private addresses, in any spelling or via redirect."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from sdworker.errors import InputImageError
from sdworker.fetch import read_image_bytes
from sdworker.netguard import AddressPolicy, UnsafeUrlError


class Listener:
    """A bare TCP listener on loopback that counts the connections it accepts."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # v4 and v6 loopback
        self.sock.bind(("::", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    item = Listener()
    yield item
    item.close()


def fetch(url: str, policy: AddressPolicy | None = None) -> bytes:
    return read_image_bytes(url, field="image", max_bytes=10_000, timeout_s=2, policy=policy)


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://[::1]:{port}/x.png",
        "http://0x7f000001:{port}/x.png",
        "http://2130706433:{port}/x.png",
        "http://0177.0.0.1:{port}/x.png",
        "http://127.1:{port}/x.png",
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        "http://localhost:{port}/x.png",
        "http://0.0.0.0:{port}/x.png",
    ],
)
def test_loopback_in_any_spelling_is_refused_without_a_connection(
    listener: Listener, template: str
) -> None:
    with pytest.raises(InputImageError, match=r"^image: refused .*private, loopback") as info:
        fetch(template.format(port=listener.port))
    assert info.value.field == "image"
    assert listener.accepted == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.1.2.3/a.png",
        "http://172.16.0.1/a.png",
        "http://192.168.1.1/a.png",
        "http://100.64.0.1/a.png",
        "http://224.0.0.1/a.png",
        "http://[fe80::1]/a.png",
        "http://[fc00::1]/a.png",
    ],
)
def test_private_metadata_and_multicast_addresses_are_refused(url: str) -> None:
    with pytest.raises(InputImageError, match="private, loopback or reserved"):
        fetch(url)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "only http and https"),
        ("ftp://example.com/a.png", "only http and https"),
        ("gopher://127.0.0.1:70/", "only http and https"),
        ("http://user:pw@example.com/a.png", "credentials"),
        ("http:///a.png", "no host"),
    ],
)
def test_other_schemes_and_odd_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InputImageError, match=reason):
        fetch(url)


class _Redirector(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Redirector.requests.append(self.path)
        if self.path == "/to-private":
            self.send_response(302)
            self.send_header(
                "Location", f"http://127.0.0.1:{self.server.server_address[1]}/secret.png"
            )
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"inner")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_redirect_to_a_private_address_is_refused() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # "localhost" stands in for a public host: allowed by name, not by address.
        policy = AddressPolicy.from_list(["localhost"])
        url = f"http://localhost:{server.server_address[1]}/to-private"
        with pytest.raises(
            InputImageError, match=r"refused http://127\.0\.0\.1:\d+/secret\.png: .*private"
        ):
            fetch(url, policy)
        assert _Redirector.requests == ["/to-private"]  # the private target never got a request
    finally:
        server.shutdown()
        server.server_close()


def test_allow_list_admits_named_networks(listener: Listener) -> None:
    policy = AddressPolicy.from_list(["127.0.0.0/8", "::1"])
    target = policy.resolve(f"http://127.0.0.1:{listener.port}/x")
    assert target.url == f"http://127.0.0.1:{listener.port}/x" and target.host_header.endswith(
        str(listener.port)
    )
    assert policy.resolve("http://[::1]/x").url == "http://[::1]/x"
    with pytest.raises(UnsafeUrlError):
        policy.resolve("http://10.0.0.1/x")


def test_public_address_is_pinned_with_the_host_kept_for_tls() -> None:
    target = AddressPolicy().resolve("https://93.184.215.14:8443/a.png?x=1")
    assert target.url == "https://93.184.215.14:8443/a.png?x=1"
    assert (target.host, target.host_header, target.scheme) == (
        "93.184.215.14", "93.184.215.14:8443", "https",
    )  # fmt: skip


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/x.png",
        "http://[::1]:{port}/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://0x7f000001:{port}/x.png",
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        "file:///etc/passwd",
    ],
)
@pytest.mark.parametrize("field", ["image", "mask"])
def test_the_api_refuses_such_inputs_with_a_422_naming_the_field(
    tmp_path: Path, listener: Listener, template: str, field: str
) -> None:
    from fastapi.testclient import TestClient

    from sdworker.api.app import create_app
    from sdworker.settings import Settings

    url = template.format(port=listener.port)
    body = (
        {"prompt": "x", "image": url, "mask": url}
        if field == "mask"
        else {"prompt": "x", "image": url}
    )
    if field == "mask":  # a valid inline image, so the mask is what gets refused
        body["image"] = "data:image/png;base64," + _png_base64()
    with TestClient(create_app(Settings(_env_file=None, data_dir=tmp_path))) as client:
        response = client.post("/v1/jobs", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", field]
    assert listener.accepted == 0


def _png_base64() -> str:
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
