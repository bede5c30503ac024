"""Video outputs: H.264 MP4 encoding of generated frames, the poster thumbnail, probing.

ffmpeg comes from imageio-ffmpeg's wheel (a static build with libx264), so no system
ffmpeg is needed on API or worker hosts.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import TypeAlias

import imageio_ffmpeg  # type: ignore[import-untyped]  # ships no py.typed
import numpy as np
import numpy.typing as npt
from PIL import Image

from sdworker.errors import SdworkerError
from sdworker.media import thumbnail_webp

RGBArray: TypeAlias = npt.NDArray[np.uint8]
Frame: TypeAlias = Image.Image | RGBArray
# A sequence of PIL images or (H, W, 3) arrays, or one (N, H, W, 3) uint8 array.
Frames: TypeAlias = Sequence[Image.Image] | Sequence[RGBArray] | RGBArray

CODEC = "libx264"
PIX_FMT = "yuv420p"  # the only H.264 chroma layout every browser and QuickTime plays
CRF = 18  # visually lossless; 81 frames of 832x480 measured 0.2 MB (smooth) to 4.3 MB (noisy)
PRESET = "medium"
# Encodes are byte-identical run to run. Across thread counts x264's output differed
# (when measured) only in the thread count it records in its SEI header, so a fixed count
# keeps the bytes equal across hosts with different cores: a re-run writes the same asset.
THREADS = 4
PROBE_TIMEOUT_S = 120
# RGB -> YUV with the BT.709 matrix and tag the stream as BT.709: untagged streams are
# read as BT.601 by some players and BT.709 by others, which shifts colours visibly.
_COLOUR_FILTER = (
    "scale=out_color_matrix=bt709:out_range=tv,"
    "setparams=range=tv:colorspace=bt709:color_primaries=bt709:color_trc=bt709"
)
_OUTPUT_PARAMS = [
    "-vf", _COLOUR_FILTER,
    # The same tags for the encoder: ffmpeg 4.x takes them from here, not from setparams.
    "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709",
    "-color_range", "tv",
    "-preset", PRESET,
    "-crf", str(CRF),
    "-threads", str(THREADS),
    # moov before mdat: browsers can start playing before the whole file has arrived.
    "-movflags", "+faststart",
]  # fmt: skip


class VideoError(SdworkerError):
    """ffmpeg could not encode frames, or could not decode bytes as a video."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    width: int
    height: int
    fps: int
    duration_seconds: float

    def as_dict(self) -> dict[str, int | float]:
        """JSON-ready fields, e.g. for a job result's asset metadata."""
        return asdict(self)

    def describe(self) -> dict[str, int | float]:
        """Same as as_dict (both names were announced to the worker side)."""
        return self.as_dict()


def encode_mp4(frames: Frames, fps: int) -> tuple[bytes, VideoInfo]:
    """H.264/yuv420p MP4 with faststart: every frame once, at exactly `fps`, at the
    frames' own size (width and height must be even; nothing is resized)."""
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    width, height = _common_size(frames)
    if width % 2 or height % 2:
        # yuv420p halves chroma in both directions; ffmpeg would fail or pad otherwise.
        raise ValueError(f"video frames must have even width and height, got {width}x{height}")
    with tempfile.TemporaryDirectory(prefix="sdworker-video-") as folder:
        # A file, not a pipe: faststart rewrites the file to move moov to the front.
        path = Path(folder) / "video.mp4"
        _write(path, frames, (width, height), fps)
        data = path.read_bytes() if path.exists() else b""
    boxes = mp4_top_level_boxes(data)
    if "moov" not in boxes or "mdat" not in boxes or boxes.index("moov") > boxes.index("mdat"):
        raise VideoError(f"ffmpeg wrote no complete faststart MP4 (top-level boxes: {boxes})")
    count = len(frames)
    return data, VideoInfo(count, width, height, fps, count / fps)


def poster_webp(first_frame: Frame) -> bytes:
    """The video's thumbnail: the same 256 px WEBP as an image's, of its first frame."""
    image = first_frame if isinstance(first_frame, Image.Image) else Image.fromarray(first_frame)
    return thumbnail_webp(image)


def probe_mp4(data: bytes) -> VideoInfo:
    """Decode a video and count the frames really decoded (not the container's claim)."""
    with tempfile.TemporaryDirectory(prefix="sdworker-probe-") as folder:
        path = Path(folder) / "video.mp4"
        path.write_bytes(data)
        # ffmpeg itself rather than imageio_ffmpeg.read_frames, which leaves its pipes
        # open when ffmpeg ends first (imageio-ffmpeg issue #61): a leak in a long-lived
        # worker. framecrc decodes every frame but prints only one line per frame; being a
        # variable-rate format, ffmpeg never duplicates frames to fill a rate for it. (No
        # -fps_mode: ffmpeg < 5.1, as in imageio-ffmpeg 0.5's wheel, lacks it; >= 8, -vsync.)
        command = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path)]
        command += ["-map", "0:v:0", "-f", "framecrc", "-"]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise VideoError(f"decoding the video took over {PROBE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise VideoError(f"not a decodable video: {reason[0]}")
    return _parse_framecrc(done.stdout)


def _parse_framecrc(text: str) -> VideoInfo:
    """VideoInfo from ffmpeg's framecrc listing: `#tb 0: 1/24`, `#dimensions 0: WxH`,
    then `stream, dts, pts, duration, size, crc` per decoded frame."""
    time_base = Fraction(0)
    width = height = 0
    starts: list[int] = []
    end = 0
    for line in text.splitlines():
        if line.startswith("#tb 0:"):
            time_base = Fraction(line.split(":", 1)[1].strip())
        elif line.startswith("#dimensions 0:"):
            width, height = (int(n) for n in line.split(":", 1)[1].strip().split("x"))
        elif line.startswith("0,"):
            _, _, pts, duration, *_ = (field.strip() for field in line.split(","))
            starts.append(int(pts))
            end = max(end, int(pts) + int(duration))
    if not starts or not time_base:
        raise VideoError("not a decodable video: no video frames")
    seconds = (end - min(starts)) * time_base
    fps = round(len(starts) / seconds) if seconds else 0
    return VideoInfo(len(starts), width, height, fps, len(starts) / fps if fps else 0.0)


def mp4_top_level_boxes(data: bytes) -> list[str]:
    """The types of an MP4's top-level boxes in file order, e.g. ftyp, moov, mdat."""
    boxes: list[str] = []
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8].decode("latin-1")
        if size == 1 and offset + 16 <= len(data):  # 64-bit size follows the type
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            size = len(data) - offset
        if size < 8:
            break  # corrupt; stop rather than loop
        boxes.append(kind)
        offset += size
    return boxes


def _common_size(frames: Frames) -> tuple[int, int]:
    """(width, height) shared by all frames; ValueError naming the first misfit."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"a frames array must be (N, H, W, 3), got shape {frames.shape}")
    if len(frames) == 0:
        raise ValueError("a video needs at least one frame")
    sizes = [_size_of(frame) for frame in frames]
    for index, size in enumerate(sizes):
        if size != sizes[0]:
            raise ValueError(
                f"all video frames must have one size: frame 0 is {sizes[0][0]}x{sizes[0][1]}, "
                f"frame {index} is {size[0]}x{size[1]}"
            )
    return sizes[0]


def _size_of(frame: Frame) -> tuple[int, int]:
    if isinstance(frame, Image.Image):
        return frame.size
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(
            f"video frames must be RGB uint8 (H, W, 3), got {frame.dtype} {frame.shape}"
        )
    return int(frame.shape[1]), int(frame.shape[0])


def _rgb24(frames: Frames) -> Iterator[bytes | RGBArray]:
    """Each frame as packed RGB rows, one at a time (never all converted at once)."""
    for frame in frames:
        if isinstance(frame, Image.Image):
            yield frame.convert("RGB").tobytes()
        else:
            yield np.ascontiguousarray(frame)


def _write(path: Path, frames: Frames, size: tuple[int, int], fps: int) -> None:
    writer = imageio_ffmpeg.write_frames(
        str(path),
        size,
        pix_fmt_in="rgb24",
        pix_fmt_out=PIX_FMT,
        fps=fps,
        codec=CODEC,
        quality=None,  # CRF is set in _OUTPUT_PARAMS instead of imageio's 1-10 scale
        macro_block_size=1,  # never let imageio rescale; size is checked to be even
        ffmpeg_log_level="error",
        output_params=list(_OUTPUT_PARAMS),
    )
    try:
        writer.send(None)  # starts ffmpeg
        for frame in _rgb24(frames):
            writer.send(frame)
    except OSError as error:  # ffmpeg exited early: its stdin pipe broke
        raise VideoError(f"ffmpeg failed to encode the video: {error}") from None
    finally:
        writer.close()  # ends the input and waits for ffmpeg to finish the file
