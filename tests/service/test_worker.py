"""The worker loop with one fake engine per failure mode: real broker, real storage."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdworker.broker.sqlite import SqliteBroker
from sdworker.engine.engine import Cancelled, EngineResult, Latents
from sdworker.errors import InputImageError, OutOfMemoryError
from sdworker.families import SDXL
from sdworker.jobs import EventType, JobSpec, JobStatus
from sdworker.planning import plan_generation
from sdworker.settings import Settings
from sdworker.storage.local import LocalStorage
from sdworker.worker import FatalEngineError, Worker


class FakeEngine:
    """Solid-colour images after `steps` fake steps of `step_s` seconds each."""

    def __init__(self, step_s: float = 0.0, error: Exception | None = None) -> None:
        self.step_s, self.error, self.loaded = step_s, error, False

    def load(self, model: str | None = None) -> object:
        self.loaded = True
        return object()

    def run(self, spec: JobSpec, on_step: Any = None, is_cancelled: Any = None) -> Any:
        plan = plan_generation(spec, SDXL, max_num_images=8)
        if self.error is not None:
            raise self.error
        for step in range(1, plan.denoise_steps + 1):
            time.sleep(self.step_s)
            if on_step:
                on_step(step, plan.denoise_steps)
            if is_cancelled and is_cancelled() and step < plan.denoise_steps:
                return Cancelled(step=step, total_steps=plan.denoise_steps)
        images = [
            Image.new("RGB", (plan.width, plan.height), (10 * i, 80, 160))
            for i in range(plan.num_images)
        ]
        latents = Latents(b"\0" * 8, (1, 4, 1, 1)) if spec.return_latents else None
        return EngineResult(
            images=images, seeds=plan.seeds, plan=plan, model="fake", family="sdxl", device="cpu",
            dtype="fp32", latents=latents, timings={"load_s": 0.5, "inference_s": 0.25},
        )  # fmt: skip


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Settings, SqliteBroker, LocalStorage]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, progress_interval_s=0, heartbeat_interval_s=0.1,
        poll_interval_s=0.02,
    )  # fmt: skip
    broker = SqliteBroker(settings.database_path)
    yield settings, broker, LocalStorage(settings.assets_dir, "http://test")
    broker.close()


def make_worker(parts: Any, engine: Any, **overrides: Any) -> Worker:
    settings, broker, storage = parts
    return Worker(settings.model_copy(update=overrides), broker, storage, engine, "w1")


def spec(**fields: Any) -> JobSpec:
    return JobSpec(**({"prompt": "x", "size": "64x96", "steps": 4, "seed": 3} | fields))


def test_a_job_is_stored_and_completed(parts: Any, tmp_path: Path) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec(num_images=2, metadata={"user_id": "alice"}))
    assert make_worker(parts, FakeEngine()).run_once()
    done = broker.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.result is not None
    assert [a.key for a in done.result.assets] == [f"alice/{job.id}/0.png", f"alice/{job.id}/1.png"]
    for index, asset in enumerate(done.result.assets):
        assert asset.url == f"http://test/v1/assets/alice/{job.id}/{index}.png"
        assert asset.thumbnail_key == f"alice/{job.id}/{index}.thumb.webp"
        with Image.open(tmp_path / "assets" / asset.key) as png:
            assert "Seed: " + str(3 + index) in png.text["parameters"]
        with Image.open(tmp_path / "assets" / asset.thumbnail_key) as thumb:
            assert thumb.format == "WEBP" and thumb.size == (64, 96)  # never upscaled
        meta = asset.metadata
        assert (
            meta["seed"] == 3 + index and meta["asset_index"] == index and meta["batch_size"] == 2
        )
        assert meta["pipeline"] == "text2img" and meta["format"] == "png" and meta["steps"] == 4
        assert meta["file_size_bytes"] == (tmp_path / "assets" / asset.key).stat().st_size
    timings = done.result.timings
    assert timings.load_s == 0.5 and timings.inference_s == 0.25
    assert timings.total_s >= timings.encode_s + timings.store_s > 0
    assert done.result.seeds == [3, 4]


def test_thumbnail_longest_edge_is_256(parts: Any, tmp_path: Path) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec(size="1024x512", steps=1))
    make_worker(parts, FakeEngine()).run_once()
    asset = broker.get(job.id).result.assets[0]  # type: ignore[union-attr]
    with Image.open(tmp_path / "assets" / asset.thumbnail_key) as thumb:
        assert thumb.size == (256, 128)


def test_jpeg_output_and_base64_delivery(parts: Any) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec(output_format="jpeg", return_base64=True, return_latents=True))
    make_worker(parts, FakeEngine()).run_once()
    result = broker.get(job.id).result
    assert (
        result is not None and result.latents is not None and result.latents.shape == [1, 4, 1, 1]
    )
    asset = result.assets[0]
    assert asset.key.endswith("0.jpeg") and asset.content_type == "image/jpeg"
    assert Image.open(io.BytesIO(base64.b64decode(asset.base64 or ""))).format == "JPEG"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InputImageError("image: not a readable image", field="image"), "invalid_input_image"),
        (OutOfMemoryError("out of device memory"), "out_of_memory"),
        (ValueError("boom"), "internal_error"),
    ],
)
def test_a_failing_job_fails_alone_and_the_worker_goes_on(
    parts: Any, error: Exception, code: str
) -> None:
    _, broker, _ = parts
    bad, _ = broker.enqueue(spec())
    good, _ = broker.enqueue(spec())
    engine = FakeEngine(error=error)
    worker = make_worker(parts, engine)
    worker.run_once()
    failed = broker.get(bad.id)
    assert failed.status is JobStatus.FAILED and failed.error is not None
    assert failed.error.code == code and "Traceback" not in failed.error.message
    engine.error = None
    worker.run_once()
    assert broker.get(good.id).status is JobStatus.SUCCEEDED


def test_a_lost_device_fails_the_job_and_stops_the_worker(parts: Any) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec())
    worker = make_worker(
        parts, FakeEngine(error=RuntimeError("CUDA error: an illegal memory access"))
    )
    with pytest.raises(FatalEngineError):
        worker.run_once()
    assert broker.get(job.id).error.code == "engine_fatal"  # type: ignore[union-attr]


def test_cancel_mid_run_stops_at_the_next_step(parts: Any) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec(steps=50))
    worker = make_worker(parts, FakeEngine(step_s=0.02))
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    while broker.get(job.id).progress.step < 3:
        time.sleep(0.01)
    broker.cancel(job.id)
    thread.join(timeout=10)
    done = broker.get(job.id)
    assert done.status is JobStatus.CANCELED and done.progress.step < 50
    assert broker.events(job.id)[-1].type is EventType.CANCELED


def test_progress_is_throttled_but_the_last_step_is_sent(parts: Any) -> None:
    _, broker, _ = parts
    job, _ = broker.enqueue(spec(steps=40))
    make_worker(parts, FakeEngine(step_s=0.005), progress_interval_s=0.05).run_once()
    steps = [e.data["step"] for e in broker.events(job.id) if e.type is EventType.PROGRESS]
    assert 1 < len(steps) < 40 and steps[-1] == 40 and steps == sorted(steps)


def test_run_forever_loads_the_model_heartbeats_and_drains(parts: Any) -> None:
    _, broker, _ = parts
    engine = FakeEngine(step_s=0.01)
    worker = make_worker(parts, engine)
    thread = threading.Thread(target=worker.run_forever)
    thread.start()
    job, _ = broker.enqueue(spec(steps=30))
    while broker.get(job.id).status is JobStatus.QUEUED:
        time.sleep(0.01)
    worker.stop()  # while running: the job still finishes
    thread.join(timeout=10)
    assert not thread.is_alive() and engine.loaded
    assert broker.get(job.id).status is JobStatus.SUCCEEDED
    (info,) = broker.stats().workers
    assert info.id == "w1" and info.model_loaded and info.current_job is None
