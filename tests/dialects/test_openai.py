"""The OpenAI Images dialect through the real `openai` SDK against a live service:
generations (b64_json, url, jpeg), edits (img2img, inpaint with OpenAI's transparent
masks), OpenAI's error objects and API keys."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from openai import OpenAI
from PIL import Image

from sdworker.api.dialects.openai_images import Target, _fitted, _quality_fields
from sdworker.errors import OutOfMemoryError
from sdworker.families import SD15, SDXL
from sdworker.options import PresetDefaults
from sdworker.planning import Features
from tests.conftest import gradient_image
from tests.dialects.conftest import LiveService, live_service

TINY: dict[str, Any] = {"steps": 2}  # sdworker extensions go in the SDK's extra_body


@pytest.fixture(scope="module")
def client(live: LiveService) -> OpenAI:
    return OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str | None) -> Image.Image:
    assert b64 is not None
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def job_of(live: LiveService, response: Any) -> dict[str, Any]:
    """The native job behind a response (its x-request-id is the job id)."""
    job = live.client.get(f"/v1/jobs/{response._request_id}")
    assert job.status_code == 200, job.text
    result: dict[str, Any] = job.json()
    return result


def left_transparent_mask(width: int = 64, height: int = 64) -> bytes:
    """OpenAI's mask convention: transparent (alpha 0) on the left half = edit there."""
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, : width // 2, 3] = 0
    return png_bytes(Image.fromarray(rgba, "RGBA"))


def test_gpt_image_returns_n_distinct_base64_pngs(live: LiveService, client: OpenAI) -> None:
    response = client.images.generate(
        model="gpt-image-1", prompt="a paper fox", n=2, size="64x64", extra_body=TINY | {"seed": 7}
    )
    assert response.data is not None and len(response.data) == 2
    images = [decoded(item.b64_json) for item in response.data]  # gpt-image: b64 by default
    assert all(item.url is None for item in response.data)
    assert [image.format for image in images] == ["PNG", "PNG"]
    assert [image.size for image in images] == [(64, 64), (64, 64)]
    assert np.abs(pixels(images[0]) - pixels(images[1])).mean() > 5  # seeds 7 and 8
    assert (response.size, response.output_format, response.background) == (
        "64x64",
        "png",
        "opaque",
    )
    assert (response.quality, response.usage) == ("medium", None)
    job = job_of(live, response)
    assert job["result"]["seeds"] == [7, 8]
    assert job["spec"]["model"] is None  # OpenAI's names run the default model


def test_url_response_serves_the_same_bytes_as_b64(live: LiveService, client: OpenAI) -> None:
    asked = {"prompt": "a lighthouse", "size": "64x64", "extra_body": TINY | {"seed": 11}}
    by_url = client.images.generate(model="dall-e-3", **asked)  # dall-e: url by default
    assert by_url.data is not None and by_url.data[0].b64_json is None
    url = by_url.data[0].url
    assert url is not None and url.startswith(f"{live.url}/v1/assets/")
    assert by_url.data[0].revised_prompt == "a lighthouse"
    fetched = live.client.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    inline = client.images.generate(model="dall-e-3", response_format="b64_json", **asked)
    assert inline.data is not None and inline.data[0].b64_json is not None
    assert base64.b64decode(inline.data[0].b64_json) == fetched.content


def test_output_format_jpeg_and_user_owns_the_assets(live: LiveService, client: OpenAI) -> None:
    response = client.images.generate(
        model="gpt-image-1-mini",
        prompt="a red kite",
        size="64x64",
        output_format="jpeg",
        output_compression=80,
        moderation="low",
        user="alice",
        extra_body=TINY,
    )
    assert response.data is not None and response.output_format == "jpeg"
    image = decoded(response.data[0].b64_json)
    assert (image.format, image.size) == ("JPEG", (64, 64))
    job = job_of(live, response)
    assert job["spec"]["metadata"] == {"user_id": "alice"}
    assert job["spec"]["output_quality"] == 80  # output_compression is the JPEG quality
    assert job["result"]["assets"][0]["key"].startswith("alice/")


def test_quality_high_uses_the_refiner_or_more_steps() -> None:
    def target(**features: Any) -> Target:
        return Target(None, "gpt-image-1", SDXL, Features(**features))

    assert _quality_fields("hd", target(refiner=True)) == {"preset": "sdxl_image_high", "steps": 30}
    assert _quality_fields("high", target()) == {"steps": 45}
    assert _quality_fields("standard", target()) == {}
    own = PresetDefaults("registry", steps=20)
    assert _quality_fields("low", target(model_defaults=own)) == {"steps": 10}
    assert _quality_fields("high", target(variant="turbo")) == {}  # distilled: steps fixed


def test_edit_sizes_follow_the_input_within_the_models_bounds() -> None:
    assert _fitted(70, 90, SDXL) == (72, 88)  # the nearest multiples of 8
    assert _fitted(70, 50, SDXL) == (88, 64)  # scaled up to the smallest side
    assert _fitted(4096, 2048, SDXL) == (2048, 1024)
    assert _fitted(40, 80, SD15) == (64, 128)


def test_edit_without_mask_is_img2img_at_the_inputs_size(live: LiveService, client: OpenAI) -> None:
    outputs = []
    for flip in (False, True):
        source = gradient_image(70, 90)
        if flip:
            source = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        response = client.images.edit(
            image=("in.png", png_bytes(source), "image/png"),
            prompt="a watercolour",
            response_format="b64_json",
            extra_body={"steps": 4, "seed": 3},
        )
        assert response.data is not None
        outputs.append(decoded(response.data[0].b64_json))
    assert [image.size for image in outputs] == [(72, 88), (72, 88)]  # 70x90 to multiples of 8
    # Same seed and prompt, mirrored inputs: the input steers the output (weakly: the
    # tiny model's VAE has random weights; the seed alone moves it by ~40).
    assert np.abs(pixels(outputs[0]) - pixels(outputs[1])).mean() > 1
    spec = job_of(live, response)["spec"]
    assert (spec["strength"], spec["mask"], spec["width"], spec["height"]) == (0.6, None, 72, 88)


def test_edit_with_mask_repaints_only_the_transparent_half(
    live: LiveService, client: OpenAI
) -> None:
    source = png_bytes(gradient_image(64, 64))
    outputs, responses = [], []
    for seed in (1, 2):
        response = client.images.edit(
            model="gpt-image-1",
            image=("in.png", source, "image/png"),
            mask=("mask.png", left_transparent_mask(), "image/png"),
            prompt="a fox",
            extra_body={"steps": 4, "seed": seed},
        )
        assert response.data is not None
        outputs.append(pixels(decoded(response.data[0].b64_json)))
        responses.append(response)
    change = np.abs(outputs[0] - outputs[1])
    # The tiny model's VAE has random weights, so kept pixels are the input's VAE round
    # trip, not the input: they come from the input, not the seed. The repainted half
    # comes from the seed. (Columns next to the border mix both in the VAE decoder.)
    assert change[:, 48:].mean() < 5
    assert change[:, :32].mean() > 25
    # OpenAI's transparent = edit became sdworker's white = repaint.
    spec = job_of(live, responses[0])["spec"]
    mask = np.asarray(decoded(spec["mask"].split(",", 1)[1]).convert("L"))
    assert (mask[:, :32] == 255).all() and (mask[:, 32:] == 0).all()
    assert spec["strength"] is None  # inpainting's own default


def test_dall_e_2_inpaints_an_images_own_transparency(live: LiveService, client: OpenAI) -> None:
    rgba = np.asarray(gradient_image(64, 64).convert("RGBA")).copy()
    rgba[:, 32:, 3] = 0  # transparent right half: DALL-E 2 edits there when no mask is sent
    image = png_bytes(Image.fromarray(rgba, "RGBA"))
    edited = client.images.edit(
        model="dall-e-2", image=("in.png", image, "image/png"), prompt="sky", extra_body=TINY
    )
    assert edited.data is not None and edited.data[0].url is not None
    mask = job_of(live, edited)["spec"]["mask"]
    assert mask is not None
    white = np.asarray(decoded(mask.split(",", 1)[1]).convert("L"))
    assert (white[:, 32:] == 255).all() and (white[:, :32] == 0).all()
    # gpt-image models edit the whole picture: its alpha is not a mask there.
    # (A list of one image goes as `image[]`, as the SDK sends several.)
    whole = client.images.edit(
        model="gpt-image-1", image=[("in.png", image, "image/png")], prompt="sky", extra_body=TINY
    )
    assert job_of(live, whole)["spec"]["mask"] is None


BAD_GENERATIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"n": 0}, "n", "from 1 to 8"),
    ({"n": 9}, "n", "from 1 to 8"),
    ({"size": "big"}, "size", "multiples of 8 from 64 to 2048"),
    ({"size": "100x100"}, "size", "1024x1024, 1792x1024"),
    ({"size": "4096x4096"}, "size", "from 64 to 2048"),
    ({"model": "no-such-model"}, "model", "tiny-sdxl, or an OpenAI model name (dall-e-2"),
    ({"prompt": openai.omit}, "prompt", "Missing required parameter: 'prompt'"),
    ({"prompt": "  "}, "prompt", "empty string"),
    ({"quality": "ultra"}, "quality", "'standard', 'hd', 'low'"),
    ({"response_format": "bytes"}, "response_format", "'url' or 'b64_json'"),
    ({"output_format": "gif"}, "output_format", "'png', 'jpeg' or 'webp'"),
    ({"background": "transparent"}, "background", "'opaque' or 'auto'"),
    ({"stream": True}, "stream", "not supported"),
    ({"extra_body": {"colour": "red"}}, "colour", "Unrecognized request argument"),
    ({"extra_body": {"steps": 500}}, "steps", "less than or equal to 150"),
]


@pytest.mark.parametrize(("changes", "param", "message"), BAD_GENERATIONS)
def test_bad_generations_are_openai_400s_naming_the_param(
    client: OpenAI, changes: dict[str, Any], param: str, message: str
) -> None:
    asked: dict[str, Any] = {"prompt": "a fox", "size": "64x64"} | changes
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**asked)
    error = caught.value
    assert error.status_code == 400
    assert isinstance(error.body, dict) and error.body["type"] == "invalid_request_error"
    assert error.param == param, error.body
    assert message in error.message, error.message


def test_bad_edits_are_openai_400s(client: OpenAI) -> None:
    image = ("in.png", png_bytes(gradient_image(64, 64)), "image/png")
    opaque_mask = ("mask.png", png_bytes(gradient_image(64, 64).convert("RGBA")), "image/png")
    small_mask = ("mask.png", left_transparent_mask(32, 32), "image/png")
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"image": [image, image]}, "image", "2 images sent"),
        ({"mask": opaque_mask}, "mask", "transparent (alpha 0) pixels mark where to edit"),
        ({"mask": small_mask}, "mask", "must be the same size"),
        ({"image": ("in.txt", b"hello", "text/plain")}, "image", "not a PNG, JPEG or WEBP"),
        ({"n": 12}, "n", "from 1 to 8"),
        ({"size": "65x64"}, "size", "multiples of 8"),
    ]
    for changes, param, message in cases:
        asked: dict[str, Any] = {"image": image, "prompt": "a fox"} | changes
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.edit(**asked)
        assert caught.value.param == param, caught.value.body
        assert message in caught.value.message, caught.value.message


def test_api_keys_are_checked(make_live: Callable[..., LiveService]) -> None:
    service = make_live(api_keys="k1")
    wrong = OpenAI(base_url=f"{service.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.images.generate(prompt="a fox", size="64x64", extra_body=TINY)
    right = OpenAI(base_url=f"{service.url}/v1", api_key="k1", max_retries=0)
    response = right.images.generate(
        prompt="a fox", size="64x64", response_format="b64_json", extra_body=TINY
    )
    assert response.data is not None and decoded(response.data[0].b64_json).size == (64, 64)


def test_a_job_that_outlasts_the_wait_is_a_504_and_goes_on(
    make_live: Callable[..., LiveService],
) -> None:
    service = make_live(sync_timeout_s=0.05)
    client = OpenAI(base_url=f"{service.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="a fox", size="64x64", quality="low")
    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"
    found = re.search(r"GET /v1/jobs/(\S+)\)", caught.value.message)
    assert found is not None, caught.value.message
    job = service.client.get(f"/v1/jobs/{found[1]}").json()
    assert job["status"] in ("queued", "running")
    assert job["spec"]["steps"] == SDXL.default_steps // 2  # quality=low: half the steps
    assert service.client.delete(f"/v1/jobs/{found[1]}").status_code == 200


class FailingEngine:
    """An engine whose every job fails, as one that runs out of device memory."""

    def load(self, model: str | None = None) -> object:
        return object()

    def run(self, spec: Any, on_step: Any = None, is_cancelled: Any = None) -> Any:
        raise OutOfMemoryError("out of device memory at 64x64")


def test_a_failed_job_is_a_500_with_its_message(tmp_path: Path, cache_dir: Path) -> None:
    with live_service(tmp_path, cache_dir, FailingEngine()) as service:
        client = OpenAI(base_url=f"{service.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt="a fox", size="64x64", extra_body=TINY)
    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "server_error"
    assert "out of device memory at 64x64" in caught.value.message
