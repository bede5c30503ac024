"""MP4 encoding of generated frames, the poster thumbnail, probing, and video asset keys."""

from __future__ import annotations

import io
import re
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from sdworker.media import thumbnail_webp
from sdworker.storage.base import content_type_of, image_key, thumbnail_key, video_key
from sdworker.storage.local import LocalStorage
from sdworker.video import (
    VideoError,
    VideoInfo,
    encode_mp4,
    mp4_top_level_boxes,
    poster_webp,
    probe_mp4,
)

FRAMES = 17
# Per-channel tolerance on a frame's mean colour after yuv420p + CRF 18 and back.
MEAN_TOLERANCE = 4.0
SIZES = [(64, 48), (832, 480)]
FPS = [15, 24]


def clip(width: int, height: int, count: int = FRAMES) -> np.ndarray:
    """`count` frames (N, H, W, 3): distinct base colours under a mild diagonal gradient,
    so frames are told apart by their mean colour and blocks are not all flat."""
    ramp = np.add.outer(np.arange(height), np.arange(width)) / (width + height)  # 0..1
    frames = []
    for i in range(count):
        base = np.array([(i * 61) % 200, (i * 113 + 40) % 200, (i * 29 + 90) % 200], float)
        frames.append(base[None, None, :] + 50 * ramp[:, :, None])
    return np.stack(frames).round().astype(np.uint8)


FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# ffmpeg's description of the stream, e.g.
# "Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(tv, bt709,
# progressive), 64x48, 21 kb/s, 15 fps, 15 tbr, 15360 tbn (default)"
_STREAM = re.compile(
    r"Stream #0:0\S*: Video: (?P<codec>\w+).*?, (?P<pix_fmt>yuv\w+(?:\([^)]*\))?), "
    r"(?P<width>\d+)x(?P<height>\d+).*?, (?P<fps>[\d.]+) fps"
)


def decode(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """All decoded RGB frames (N, H, W, 3) and the stream's codec, pix_fmt, size, fps.

    ffmpeg is run directly: imageio's and imageio_ffmpeg's readers leave pipes open when
    ffmpeg ends first (imageio-ffmpeg issue #61), a ResourceWarning, here an error."""
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "video.mp4")
        Path(path).write_bytes(data)
        header = subprocess.run(
            [FFMPEG, "-hide_banner", "-nostdin", "-i", path], capture_output=True, text=True
        ).stderr
        to_rgb = ["-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24"]
        raw = subprocess.run(
            [FFMPEG, "-v", "error", "-nostdin", "-i", path, *to_rgb, "-"],
            capture_output=True,
            check=True,
        ).stdout
    match = _STREAM.search(header)
    assert match, header
    width, height = int(match["width"]), int(match["height"])
    meta = {
        "codec": match["codec"],
        "pix_fmt": match["pix_fmt"],
        "size": (width, height),
        "fps": float(match["fps"]),
    }
    assert len(raw) % (width * height * 3) == 0
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3), meta


_encoded: dict[tuple[int, int, int], tuple[bytes, VideoInfo]] = {}


def encoded(width: int, height: int, fps: int) -> tuple[bytes, VideoInfo]:
    """One encode per size and fps for the whole module (the CPU is shared)."""
    key = (width, height, fps)
    if key not in _encoded:
        _encoded[key] = encode_mp4(clip(width, height), fps)
    return _encoded[key]


# --------------------------------------------------------------------------- encode_mp4


@pytest.mark.parametrize("fps", FPS)
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_every_frame_at_its_size_and_fps_as_h264_yuv420p(width: int, height: int, fps: int) -> None:
    data, info = encoded(width, height, fps)
    frames, meta = decode(data)
    assert frames.shape == (FRAMES, height, width, 3)
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == fps
    assert tuple(meta["size"]) == (width, height)
    assert info == VideoInfo(FRAMES, width, height, fps, FRAMES / fps)
    assert probe_mp4(data) == info


@pytest.mark.parametrize(("width", "height"), SIZES)
def test_colours_survive_in_every_frame(width: int, height: int) -> None:
    data, _ = encoded(width, height, 24)
    decoded, _ = decode(data)
    source = clip(width, height).reshape(FRAMES, -1, 3).mean(axis=1)
    got = decoded.reshape(FRAMES, -1, 3).mean(axis=1)
    # Every frame, in order: a dropped, doubled or swapped frame shows as a colour jump.
    assert np.abs(got - source).max() <= MEAN_TOLERANCE


def test_stream_is_tagged_bt709() -> None:
    # Untagged yuv is read as BT.601 by some players and BT.709 by others.
    data, _ = encoded(64, 48, 15)
    # ffmpeg prints one "bt709" when matrix, primaries and transfer all are BT.709.
    assert re.match(r"yuv420p\(tv, bt709[,)]", decode(data)[1]["pix_fmt"])


def test_faststart_puts_moov_before_mdat() -> None:
    data, _ = encoded(832, 480, 24)
    boxes = mp4_top_level_boxes(data)
    assert boxes[0] == "ftyp"
    assert boxes.index("moov") < boxes.index("mdat")
    assert data.find(b"moov") < data.find(b"mdat")  # independent of the box parser


def test_same_frames_give_the_same_bytes_from_arrays_or_images() -> None:
    frames = clip(64, 48)
    images = [Image.fromarray(frame) for frame in frames]
    data, _ = encoded(64, 48, 15)
    assert encode_mp4(frames, 15)[0] == data
    assert encode_mp4(images, 15)[0] == data
    assert encode_mp4(list(frames), 15)[0] == data


def test_even_size_off_the_macroblock_grid_is_not_resized() -> None:
    data, info = encode_mp4(clip(70, 46, count=3), 8)
    frames, meta = decode(data)
    assert frames.shape == (3, 46, 70, 3)
    assert tuple(meta["size"]) == (70, 46)
    assert (info.width, info.height) == (70, 46)


def test_a_single_frame_is_a_video() -> None:
    data, info = encode_mp4(clip(64, 48, count=1), 24)
    assert probe_mp4(data) == info == VideoInfo(1, 64, 48, 24, 1 / 24)


@pytest.mark.parametrize(("width", "height"), [(65, 48), (64, 47), (63, 31)])
def test_odd_sizes_are_refused_with_the_size(width: int, height: int) -> None:
    with pytest.raises(ValueError, match=f"even width and height, got {width}x{height}"):
        encode_mp4(clip(width, height, count=2), 15)


def test_frames_of_different_sizes_are_refused() -> None:
    frames = [Image.new("RGB", (64, 48)), Image.new("RGB", (64, 48)), Image.new("RGB", (32, 48))]
    with pytest.raises(ValueError, match="frame 2 is 32x48"):
        encode_mp4(frames, 15)


@pytest.mark.parametrize(
    "frames",
    [
        [],
        np.zeros((0, 48, 64, 3), np.uint8),
        np.zeros((48, 64, 3), np.uint8),  # one frame, not a clip
        np.zeros((2, 48, 64, 3), np.float32),  # diffusers' [0, 1] floats: convert first
        np.zeros((2, 48, 64, 4), np.uint8),
    ],
    ids=["empty-list", "empty-array", "3d-array", "float", "rgba-array"],
)
def test_unusable_frames_are_refused(frames: Any) -> None:
    with pytest.raises(ValueError):
        encode_mp4(frames, 15)


@pytest.mark.parametrize("fps", [0, -1, 2.5, True])
def test_fps_must_be_a_positive_integer(fps: Any) -> None:
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(clip(64, 48, count=2), fps)


def test_video_info_as_dict_is_json_ready() -> None:
    info = VideoInfo(81, 832, 480, 24, 81 / 24)
    expected = {"frames": 81, "width": 832, "height": 480, "fps": 24, "duration_seconds": 3.375}
    assert info.as_dict() == info.describe() == expected


# --------------------------------------------------------------------------- poster, probe


@pytest.mark.parametrize(
    ("size", "poster_size"),
    [((832, 480), (256, 148)), ((480, 832), (148, 256)), ((64, 48), (64, 48))],
)
def test_poster_is_the_first_frame_thumbnail(
    size: tuple[int, int], poster_size: tuple[int, int]
) -> None:
    first = clip(*size, count=1)[0]
    poster = poster_webp(first)
    with Image.open(io.BytesIO(poster)) as image:
        assert image.format == "WEBP"
        assert image.size == poster_size  # longest side 256, never upscaled
    assert poster == poster_webp(Image.fromarray(first)) == thumbnail_webp(Image.fromarray(first))


def test_probe_refuses_bytes_that_are_not_a_video() -> None:
    with pytest.raises(VideoError, match="not a decodable video"):
        probe_mp4(b"\x00\x00\x00\x18ftypisom but not really")


def test_probe_refuses_a_truncated_video() -> None:
    data, _ = encoded(64, 48, 15)
    with pytest.raises(VideoError):
        probe_mp4(data[: len(data) // 3])


# --------------------------------------------------------------------------- storage


def test_video_keys_and_content_type() -> None:
    assert (
        video_key("owner", "job1", 0) == image_key("owner", "job1", 0, "mp4") == "owner/job1/0.mp4"
    )
    assert thumbnail_key("owner", "job1", 0) == "owner/job1/0.thumb.webp"  # the poster
    assert content_type_of("owner/job1/0.mp4") == "video/mp4"
    assert content_type_of("owner/job1/0.MP4") == "video/mp4"


def test_local_storage_round_trip(tmp_path: Path) -> None:
    data, _ = encoded(64, 48, 15)
    storage = LocalStorage(tmp_path, "http://api:8000/")
    key = video_key("owner", "job1", 0)
    url = storage.put(key, data, content_type_of(key))
    assert url == "http://api:8000/v1/assets/owner/job1/0.mp4"
    stored = storage.get(key)
    assert (stored.data, stored.content_type) == (data, "video/mp4")


def test_asset_route_serves_mp4_as_video(tmp_path: Path) -> None:
    # Imported here: the route's module pulls in the API services (and engine config),
    # which the encoding tests above do not need.
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from sdworker.api.routes.assets import router as assets_router

    data, _ = encoded(64, 48, 15)
    storage = LocalStorage(tmp_path, "http://api:8000/")
    storage.put("owner/job1/0.mp4", data, "video/mp4")
    app = FastAPI()
    app.include_router(assets_router)
    app.state.services = SimpleNamespace(storage=storage)
    with TestClient(app) as client:
        reply = client.get("/v1/assets/owner/job1/0.mp4")
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "video/mp4"
    assert reply.content == data
