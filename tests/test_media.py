"""PNG encoding with A1111 parameters and fitting input images to the generation size."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sdworker.jobs import ResizeMode
from sdworker.media import PARAMETERS_CHUNK, a1111_parameters, encode_png, fit_to_size

FIELDS = {"Steps": 30, "Sampler": "Euler", "CFG scale": 7.5, "Seed": 1, "Size": "64x64"}


# --------------------------------------------------------------------------- a1111_parameters


def test_a1111_parameters_exact_format() -> None:
    assert a1111_parameters("prompt", "neg", FIELDS) == (
        "prompt\nNegative prompt: neg\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 1, "
        "Size: 64x64"
    )


@pytest.mark.parametrize("negative", [None, ""])
def test_a1111_parameters_without_negative_prompt(negative: str | None) -> None:
    text = a1111_parameters("a cat", negative, FIELDS)
    assert text == "a cat\nSteps: 30, Sampler: Euler, CFG scale: 7.5, Seed: 1, Size: 64x64"
    assert "Negative prompt" not in text


def test_a1111_parameters_omits_none_values_and_keeps_order() -> None:
    fields = {"Steps": 20, "Sampler": None, "Seed": 7, "Denoising strength": None, "Model": "m"}
    assert a1111_parameters("p", None, fields) == "p\nSteps: 20, Seed: 7, Model: m"


def test_a1111_parameters_keeps_falsy_non_none_values() -> None:
    assert (
        a1111_parameters("p", None, {"Seed": 0, "CFG scale": 0.0}) == "p\nSeed: 0, CFG scale: 0.0"
    )


def test_a1111_parameters_multiline_prompt() -> None:
    text = a1111_parameters("line one\nline two", "neg", {"Steps": 1})
    assert text.splitlines() == ["line one", "line two", "Negative prompt: neg", "Steps: 1"]


# --------------------------------------------------------------------------- encode_png


def gradient(size: tuple[int, int] = (32, 24)) -> Image.Image:
    image = Image.new("RGB", size)
    image.putdata(
        [(x * 7 % 256, y * 11 % 256, (x + y) % 256) for y in range(size[1]) for x in range(size[0])]
    )
    return image


def test_encode_png_writes_parameters_chunk() -> None:
    text = a1111_parameters("a cat", "dog", FIELDS)
    data = encode_png(gradient(), text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as decoded:
        assert decoded.format == "PNG"
        assert decoded.text[PARAMETERS_CHUNK] == text
        assert PARAMETERS_CHUNK == "parameters"
        assert decoded.size == (32, 24)
        assert decoded.convert("RGB").tobytes() == gradient().tobytes()


@pytest.mark.parametrize("parameters", [None, ""])
def test_encode_png_without_parameters_has_no_chunk(parameters: str | None) -> None:
    with Image.open(io.BytesIO(encode_png(gradient(), parameters))) as decoded:
        assert "parameters" not in decoded.text


def test_encode_png_is_deterministic() -> None:
    text = a1111_parameters("same", None, FIELDS)
    first = encode_png(gradient(), text)
    assert encode_png(gradient(), text) == first
    assert encode_png(gradient(), text + "!") != first


def test_encode_png_non_ascii_parameters_round_trip() -> None:
    text = a1111_parameters("café, 猫", None, {"Steps": 1})
    with Image.open(io.BytesIO(encode_png(gradient(), text))) as decoded:
        assert decoded.text["parameters"] == text


# --------------------------------------------------------------------------- fit_to_size

RED, BLUE, BLACK = (255, 0, 0), (0, 0, 255), (0, 0, 0)


def framed(size: tuple[int, int], border: int) -> Image.Image:
    """Blue edges `border` wide around a red center."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (border, border, size[0] - border, size[1] - border))
    return image


@pytest.mark.parametrize("mode", list(ResizeMode))
@pytest.mark.parametrize("source", [(100, 60), (40, 90), (64, 64), (300, 300)])
def test_fit_to_size_gives_requested_size(mode: ResizeMode, source: tuple[int, int]) -> None:
    result = fit_to_size(Image.new("RGB", source, RED), 64, 48, mode)
    assert result.size == (64, 48)
    assert result.mode == "RGB"


@pytest.mark.parametrize("mode", list(ResizeMode))
def test_fit_to_size_same_size_returned_unchanged(mode: ResizeMode) -> None:
    image = gradient((64, 48))
    assert fit_to_size(image, 64, 48, mode) is image


def test_crop_keeps_the_center() -> None:
    # 300x100, blue 80 px bands left and right around a 140 px red middle: cropping to a
    # square keeps the middle 100x100 (x 100..200), all red even with the filter's reach.
    image = Image.new("RGB", (300, 100), BLUE)
    image.paste(RED, (80, 0, 220, 100))
    result = fit_to_size(image, 50, 50, ResizeMode.CROP)
    assert result.size == (50, 50)
    for xy in [(0, 0), (49, 0), (0, 49), (49, 49), (25, 25), (2, 25), (47, 25)]:
        assert result.getpixel(xy) == RED, xy


def test_stretch_keeps_everything() -> None:
    image = Image.new("RGB", (200, 100), BLUE)
    image.paste(RED, (50, 0, 150, 100))
    result = fit_to_size(image, 50, 50, ResizeMode.STRETCH)
    assert result.getpixel((25, 25)) == RED
    assert result.getpixel((1, 25)) == BLUE  # the blue bands are squeezed, not cut off
    assert result.getpixel((48, 25)) == BLUE


def test_pad_pads_with_black() -> None:
    # a wide red image padded into a square: black above and below, red in the middle
    result = fit_to_size(Image.new("RGB", (100, 50), RED), 80, 80, ResizeMode.PAD)
    assert result.size == (80, 80)
    assert result.getpixel((40, 40)) == RED
    assert result.getpixel((40, 2)) == BLACK
    assert result.getpixel((40, 77)) == BLACK
    assert result.getpixel((0, 40)) == RED  # full width used, no side padding


def test_pad_pads_tall_image_at_the_sides() -> None:
    result = fit_to_size(Image.new("RGB", (30, 120), RED), 64, 64, ResizeMode.PAD)
    assert result.getpixel((32, 32)) == RED
    assert result.getpixel((1, 32)) == BLACK
    assert result.getpixel((62, 32)) == BLACK


def test_crop_center_differs_from_edges_when_upscaling() -> None:
    result = fit_to_size(framed((40, 40), 10), 80, 80, ResizeMode.CROP)
    assert result.getpixel((40, 40)) == RED
    assert result.getpixel((2, 2)) == BLUE


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_output_quality_trades_bytes_for_fidelity(fmt: str) -> None:
    from sdworker.media import encode_image
    from tests.conftest import gradient_image

    picture = gradient_image(128, 128).rotate(17)  # edges: lossy codecs have work to do
    low, high = encode_image(picture, fmt, None, 20), encode_image(picture, fmt, None, 95)
    assert len(low) < len(high)
    assert Image.open(io.BytesIO(low)).format == fmt.upper()
