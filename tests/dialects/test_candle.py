"""The Candle SD worker protocol (sd-worker-rbee) against a live service, read with a
real SSE client (httpx-sse): progress then complete events with base64 PNGs, img2img
and inpainting from base64 images, 422 errors before any stream, and a client that
disconnects canceling its job. Also the registration and heartbeats that
`sdworker candle-worker` sends its orchestrator (the whole command: tests/test_cli.py)."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from httpx_sse import ServerSentEvent, connect_sse
from PIL import Image

from sdworker.broker.base import WorkerInfo
from sdworker.orchestrator import Identity, OrchestratorClient, WorkerState, broker_probe
from sdworker.settings import Settings
from tests.conftest import gradient_image, half_mask
from tests.dialects.conftest import LiveService
from tests.support.receiver import Receiver

TINY = {"prompt": "a copper kettle", "steps": 2, "width": 64, "height": 64}
# Long enough to still run when the test acts on it (the test cancels it).
LONG = {"prompt": "long", "steps": 150, "width": 256, "height": 256}


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stream(live: LiveService, path: str, body: dict[str, Any]) -> list[ServerSentEvent]:
    """Every event of one request's stream (it ends after the last image or the error)."""
    with connect_sse(live.client, "POST", path, json=body) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def images(events: list[ServerSentEvent]) -> list[tuple[Image.Image, bytes, dict[str, Any]]]:
    """The decoded image, its PNG bytes and its event data of each complete event."""
    found = []
    for event in events:
        if event.event == "complete":
            data = event.json()
            assert not data["image"].startswith("data:")
            png = base64.b64decode(data["image"], validate=True)
            found.append((Image.open(io.BytesIO(png)), png, data))
    return found


def test_execute_streams_progress_then_the_image_with_its_seed(live: LiveService) -> None:
    events = stream(live, "/candle/execute", {**TINY, "seed": 4242})
    assert [e.event for e in events] == ["progress", "progress", "complete"]
    progress = [e.json() for e in events[:2]]
    assert [(p["step"], p["total_steps"], p["total"]) for p in progress] == [(1, 2, 2), (2, 2, 2)]
    assert progress[-1]["percent"] == 100.0
    assert progress[0]["type"] == "progress"
    [(image, png, data)] = images(events)
    assert image.format == "PNG" and image.size == (64, 64)
    assert data["seed"] == 4242 and data["format"] == "png" and data["type"] == "complete"
    assert isinstance(data["elapsed_ms"], int) and data["elapsed_ms"] >= 0
    # The same seed gives the same bytes; another seed another picture.
    [(_, again, _)] = images(stream(live, "/candle/execute", {**TINY, "seed": 4242}))
    assert again == png
    [(other, _, _)] = images(stream(live, "/candle/execute", {**TINY, "seed": 4243}))
    assert other.tobytes() != image.tobytes()


def test_a_missing_seed_is_drawn_and_num_samples_gives_one_event_per_image(
    live: LiveService,
) -> None:
    [(_, _, drawn)] = images(stream(live, "/candle/execute", TINY))
    assert 0 <= drawn["seed"] < 2**32
    events = stream(live, "/candle/execute", {**TINY, "seed": 10, "num_samples": 2})
    found = images(events)
    assert [data["seed"] for _, _, data in found] == [10, 11]
    assert events[-1].event == "complete"
    assert found[0][0].tobytes() != found[1][0].tobytes()


def test_img2img_keeps_the_input_size(live: LiveService) -> None:
    init = gradient_image(80, 64)
    body = {**TINY, "image": b64_png(init), "strength": 0.5, "seed": 3}
    del body["width"], body["height"]
    events = stream(live, "/candle/img2img", body)
    assert events[-1].event == "complete", events
    [(image, png, data)] = images(events)
    assert image.size == (80, 64) and data["seed"] == 3
    # The later worker's name for the image, and a size that is not a multiple of 8.
    body = {"prompt": "x", "steps": 2, "input_image": b64_png(gradient_image(83, 70))}
    [(odd, _, _)] = images(stream(live, "/candle/img2img", body))
    assert odd.size == (80, 64)
    # A data URI is accepted too, and the same seed reproduces the picture.
    uri = "data:image/png;base64," + b64_png(init)
    body = {**TINY, "init_image": uri, "strength": 0.5, "seed": 3}
    del body["width"], body["height"]
    [(_, same, _)] = images(stream(live, "/candle/img2img", body))
    assert same == png


def test_inpaint_with_base64_image_and_mask(live: LiveService) -> None:
    body = {
        "prompt": "a red door",
        "image": b64_png(gradient_image(64, 64)),
        "mask": b64_png(half_mask(64, 64)),
        "steps": 2,
        "seed": 9,
    }
    events = stream(live, "/candle/inpaint", body)
    assert [e.event for e in events][-1] == "complete", events
    assert any(e.event == "progress" for e in events)
    [(image, png, data)] = images(events)
    assert image.size == (64, 64) and data["seed"] == 9
    aliased = {**body, "init_image": body.pop("image"), "mask_image": body.pop("mask")}
    [(_, same, _)] = images(stream(live, "/candle/inpaint", aliased))
    assert same == png


def error_of(response: httpx.Response, field: str) -> str:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["field"] == field, body
    message: str = body["error"]
    assert field in message
    return message


def test_bad_input_is_a_422_naming_the_field_before_any_stream(live: LiveService) -> None:
    post = live.client.post
    assert "greater than or equal to 1" in error_of(
        post("/candle/execute", json={**TINY, "steps": 0}), "steps"
    )
    assert "required" in error_of(post("/candle/execute", json={"steps": 2}), "prompt").lower()
    bad = {"prompt": "x", "steps": 2, "image": "not base64!", "strength": 0.5}
    error_of(post("/candle/img2img", json=bad), "image")
    png = b64_png(gradient_image(64, 64))
    error_of(post("/candle/inpaint", json={"prompt": "x", "image": png}), "mask")
    small_mask = {"prompt": "x", "image": png, "mask": b64_png(half_mask(32, 32))}
    error_of(post("/candle/inpaint", json=small_mask), "mask")
    assert "over the limit" in error_of(
        post("/candle/execute", json={**TINY, "num_samples": 50}), "num_samples"
    )
    error_of(post("/candle/execute", json={**TINY, "width": 60}), "width")
    error_of(post("/candle/execute", json={**TINY, "seed": 2**40}), "seed")
    error_of(post("/candle/execute", json={**TINY, "loras": [{"path": "/x"}]}), "loras")
    # Nothing was queued for any of them.
    assert live.client.get("/v1/jobs", params={"status": "queued"}).json()["jobs"] == []


def test_health_and_ready(live: LiveService) -> None:
    health = live.client.get("/candle/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "healthy"
    assert body["worker_id"] == "dialect-worker"
    assert body["model_version"] == "tiny-sdxl"
    assert "device" in body  # the in-thread worker of this fixture names none; see test_cli
    assert body["uptime_seconds"] > 0
    ready = live.client.get("/candle/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def wait_for_status(live: LiveService, job_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job: dict[str, Any] = live.client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} is {job['status']}, not {status}")


def test_a_client_that_disconnects_cancels_its_job(live: LiveService) -> None:
    with connect_sse(live.client, "POST", "/candle/execute", json=LONG) as source:
        job_id = source.response.headers["x-job-id"]
        first = next(source.iter_sse())
        assert first.event == "progress"
    # The connection is closed: the job stops long before its 150 steps.
    job = wait_for_status(live, job_id, "canceled")
    assert job["progress"]["step"] < job["progress"]["total_steps"] == 150


def test_a_job_canceled_elsewhere_ends_the_stream_with_an_error(live: LiveService) -> None:
    with connect_sse(live.client, "POST", "/candle/execute", json=LONG) as source:
        job_id = source.response.headers["x-job-id"]
        events = source.iter_sse()
        assert next(events).event == "progress"
        assert live.client.delete(f"/v1/jobs/{job_id}").status_code == 200
        rest = list(events)
    assert rest[-1].event == "error"
    assert "canceled" in rest[-1].json()["message"]
    assert all(e.event == "progress" for e in rest[:-1])


# -- registration and heartbeats (sdworker.orchestrator) ---------------------------------


class FakeBroker:
    """Only what the probe reads: the workers' heartbeats."""

    def __init__(self, *workers: WorkerInfo) -> None:
        self.list = list(workers)

    def workers(self) -> list[WorkerInfo]:
        return self.list


def test_the_probe_reads_starting_ready_busy_and_unhealthy_from_the_heartbeats() -> None:
    settings = Settings(_env_file=None, model="tiny-sdxl", heartbeat_timeout_s=0.3)
    now = datetime.now(UTC)
    broker = FakeBroker()
    probe = broker_probe(broker, settings, "w1")  # type: ignore[arg-type]
    assert probe() == WorkerState("starting", "tiny-sdxl", "auto")  # not heard of yet
    broker.list = [WorkerInfo(id="w2", model_loaded=True, last_seen=now)]  # another worker
    assert probe().status == "starting"
    broker.list = [WorkerInfo(id="w1", device="cpu", model="m", last_seen=now)]
    assert probe() == WorkerState("starting", "m", "cpu")  # loading its model
    broker.list = [WorkerInfo(id="w1", device="cpu", model="m", model_loaded=True, last_seen=now)]
    assert probe() == WorkerState("ready", "m", "cpu")
    broker.list[0].current_job = "job-1"
    assert probe().status == "busy"
    time.sleep(0.35)  # silent past the timeout, and past the startup grace
    broker.list[0].last_seen = now - timedelta(seconds=1)
    assert probe().status == "unhealthy"


def test_the_client_retries_registration_reports_changes_at_once_and_says_goodbye() -> None:
    receiver = Receiver()
    receiver.script = [(503, {}), (500, {})]  # the orchestrator is not up yet
    state = WorkerState("starting", "tiny-sdxl", "cpu")
    identity = Identity("w3", 7000, "http://10.0.0.3:7000", "xl")
    client = OrchestratorClient(f"{receiver.url}/register", identity, lambda: state, interval_s=0.2)
    try:
        client.start()
        wait_until(lambda: len(receiver.calls) >= 4)
        state = WorkerState("ready", "tiny-sdxl", "cpu")
        wait_until(lambda: any(b["status"] == "ready" for b in bodies(receiver)))
    finally:
        client.stop()
        receiver.close()
    sent = bodies(receiver)
    assert [b["event"] for b in sent[:4]] == ["register", "register", "register", "heartbeat"]
    assert client.registered
    first = sent[0]
    assert first["worker_id"] == "w3" and first["port"] == 7000 and first["sd_version"] == "xl"
    assert first["url"] == "http://10.0.0.3:7000" and first["status"] == "starting"
    assert first["worker"] == {
        "id": "w3",
        "model_id": "tiny-sdxl",
        "device": "cpu",
        "port": 7000,
        "status": "starting",
        "implementation": "sdworker",
        "version": first["version"],
    }
    datetime.fromisoformat(first["timestamp"])
    assert sent[-1]["event"] == "shutdown" and sent[-1]["status"] == "stopped"
    assert sent[-2]["status"] == "ready"


def bodies(receiver: Receiver) -> list[dict[str, Any]]:
    return [json.loads(call["body"]) for call in list(receiver.calls)]


def wait_until(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.02)
