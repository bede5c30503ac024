"""Text-to-video through the worker and the API: a real tiny Wan model, SQLite, local
storage; the MP4 is decoded with ffmpeg."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sdworker.api.app import create_app
from sdworker.broker.sqlite import SqliteBroker
from sdworker.engine.engine import Engine
from sdworker.jobs import EventType, JobSpec, JobStatus
from sdworker.settings import Settings
from sdworker.storage.local import LocalStorage
from sdworker.worker import Worker
from tests.test_video import decode


@pytest.fixture
def video_settings(tmp_path: Path, cache_dir: Path) -> Settings:
    return Settings(
        _env_file=None, data_dir=tmp_path, cache_dir=cache_dir, device="cpu",
        model="tiny-sdxl", video_model="tiny-wan", register_video_model=True,
        progress_interval_s=0, poll_interval_s=0.02,
    )  # fmt: skip


@pytest.fixture
def broker(video_settings: Settings) -> Iterator[SqliteBroker]:
    broker = SqliteBroker(video_settings.database_path)
    yield broker
    broker.close()


def test_a_text2video_job_gives_an_mp4_with_the_asked_frames_size_and_fps(
    video_settings: Settings, broker: SqliteBroker, tmp_path: Path
) -> None:
    storage = LocalStorage(video_settings.assets_dir, "http://test")
    spec = JobSpec(prompt="a corgi running", num_frames=16, fps=8, width=96, height=64,
                   steps=2, seed=3, metadata={"user_id": "bob"})  # fmt: skip
    job, _ = broker.enqueue(spec)
    worker = Worker(video_settings, broker, storage, Engine(video_settings), "w1")
    assert worker.run_once()
    done = broker.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert done.result is not None and done.result.model == "tiny-wan"
    [asset] = done.result.assets
    assert asset.type == "video" and asset.key == f"bob/{job.id}/0.mp4"
    assert asset.content_type == "video/mp4"
    frames, meta = decode((tmp_path / "assets" / asset.key).read_bytes())
    assert frames.shape == (16, 64, 96, 3)
    assert meta["size"] == (96, 64) and meta["fps"] == 8.0
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    info = done.result.video_info
    assert info is not None
    assert (info.frames, info.width, info.height, info.fps) == (16, 96, 64, 8)
    assert info.duration_seconds == 2.0 and asset.metadata["frames"] == 16
    with Image.open(tmp_path / "assets" / asset.thumbnail_key) as poster:
        assert poster.format == "WEBP" and poster.size == (96, 64)  # never upscaled
    progress = [e for e in broker.events(job.id) if e.type is EventType.PROGRESS]
    assert [(e.data["step"], e.data["total_steps"]) for e in progress] == [(1, 2), (2, 2)]


def test_the_video_is_served_with_range_requests(
    video_settings: Settings, broker: SqliteBroker
) -> None:
    storage = LocalStorage(video_settings.assets_dir, "http://test")
    job, _ = broker.enqueue(
        JobSpec(prompt="x", task="text2video", num_frames=16, width=64, height=64, steps=1)
    )
    Worker(video_settings, broker, storage, Engine(video_settings), "w1").run_once()
    result = broker.get(job.id).result
    assert result is not None
    key = result.assets[0].key
    with TestClient(create_app(video_settings)) as client:
        whole = client.get(f"/v1/assets/{key}")
        assert whole.status_code == 200 and whole.headers["content-type"] == "video/mp4"
        part = client.get(f"/v1/assets/{key}", headers={"Range": "bytes=0-99"})
        assert part.status_code == 206 and part.content == whole.content[:100]
        status = client.get("/status").json()
        assert status["video_model"] == "tiny-wan"
        wan = next(m for m in status["models"] if m["name"] == "tiny-wan")
        assert wan["family"] == "wan-t2v" and wan["tasks"] == ["text2video"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"num_frames": 90}, "num_frames", "less than or equal to 81"),
        ({"num_frames": 8}, "num_frames", "greater than or equal to 16"),
        ({"fps": 60}, "fps", "less than or equal to 30"),
        ({"video_height": 500}, "video_height", "480 or 720"),
        ({"task": "text2video", "scheduler": "ddim"}, "scheduler", "allowed: unipc"),
        ({"task": "text2video", "image": "aGVsbG8="}, "image", "takes no image"),
        ({"task": "text2video", "model": "tiny-sdxl"}, "task", "families that can: wan-t2v"),
        ({"task": "img2img", "model": "tiny-wan", "image": "aGVsbG8="}, "task", "sdxl"),
        ({"model": "tiny-sd15", "loras": [{"name": "x"}]}, "loras", "families that do: sdxl"),
    ],
)
def test_bad_video_and_family_requests_are_422s_naming_the_field(
    video_settings: Settings, body: dict[str, Any], field: str, words: str
) -> None:
    with TestClient(create_app(video_settings.model_copy(update={"run_worker": False}))) as client:
        reply = client.post("/v1/jobs", json={"prompt": "x", **body})
    assert reply.status_code == 422, reply.text
    text = reply.text
    assert field in text and words in text, text
