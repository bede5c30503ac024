"""The LCM server protocol against a live service: image bytes with X-Seed, super-
resolution of an upload, and that server's error shapes."""

from __future__ import annotations

import io

from PIL import Image

from tests.conftest import gradient_image
from tests.dialects.conftest import LiveService

TINY = {"prompt": "a paper fox", "size": "64x64", "num_inference_steps": 2}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generate_returns_png_bytes_with_the_seed_header(live: LiveService) -> None:
    response = live.client.post("/lcm/generate", json={**TINY, "seed": 1234})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "1234"
    assert response.headers["x-superres"] == "0"
    assert response.headers["cache-control"] == "no-store"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == (64, 64)
    # The same seed gives the same picture; the stored key is the one named.
    again = live.client.post("/lcm/generate", json={**TINY, "seed": 1234})
    assert again.content == response.content
    key = response.headers["x-lcm-image-key"]
    assert live.client.get(f"/v1/assets/{key}").content == response.content


def test_a_missing_seed_is_drawn_and_reported(live: LiveService) -> None:
    response = live.client.post("/lcm/generate", json=TINY)
    assert response.status_code == 200, response.text
    assert response.headers["x-seed"].isdigit()


def test_generate_with_superres_upscales_2x_per_pass(live: LiveService) -> None:
    body = {**TINY, "superres": True, "superres_magnitude": 1, "superres_format": "jpeg"}
    response = live.client.post("/lcm/generate", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-superres"] == "1"
    assert response.headers["x-sr-scale-per-pass"] == "2"
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)
    upscale = live.client.get(f"/v1/jobs/{response.headers['x-job-id']}").json()
    assert upscale["spec"]["output_quality"] == 92  # superres_quality's default


def test_superres_upscales_an_upload(live: LiveService) -> None:
    upload = png_bytes(gradient_image(48, 32))
    for path in ("/lcm/superres", "/lcm/v1/superres"):
        response = live.client.post(
            path, files={"file": ("in.png", upload, "image/png")}, data={"magnitude": "2"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-sr-passes"] == "2"
        assert Image.open(io.BytesIO(response.content)).size == (192, 128)


def test_errors_in_that_servers_shapes(live: LiveService) -> None:
    bad_size = live.client.post("/lcm/generate", json={**TINY, "size": "big"})
    assert bad_size.status_code == 422
    assert bad_size.json()["detail"][0]["loc"] == ["body", "size"]
    too_many = live.client.post("/lcm/generate", json={**TINY, "num_inference_steps": 51})
    assert too_many.status_code == 422
    assert "num_inference_steps" in too_many.json()["detail"][0]["msg"]
    # sdworker's own checks (a size not a multiple of 8) name this protocol's field.
    odd = live.client.post("/lcm/generate", json={**TINY, "size": "60x64"})
    assert odd.status_code == 422
    assert odd.json()["detail"][0]["loc"] == ["body", "size"], odd.text
    magnitude = live.client.post(
        "/lcm/superres",
        files={"file": ("in.png", png_bytes(gradient_image(16, 16)), "image/png")},
        data={"magnitude": "3"},
    )
    assert magnitude.status_code == 422
    assert "1 (2x) or 2 (4x)" in magnitude.text
    empty = live.client.post("/lcm/superres", files={"file": ("in.png", b"", "image/png")})
    assert empty.status_code == 400
    assert empty.json() == {"detail": "Empty upload"}
    assert live.client.get("/lcm/health").json() == {"status": "ok"}
