"""The Dream AI queued image service's protocol: queue with POST /dream/generate, poll
GET /dream/status/{id} until completed, fetch the image and thumbnail URLs; that
service's error shapes, /dream/health and its Prometheus metric names.

The live service runs real jobs; an in-process app with no worker (jobs stay queued
until the test claims them from the broker) checks queue order, failed and canceled
jobs, and 503 health while no worker is ready."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sdworker.api.app import create_app
from sdworker.api.dialects.dream import device_type
from sdworker.api.services import Services
from sdworker.jobs import JobError
from sdworker.settings import Settings
from tests.dialects.conftest import LiveService

TINY = {"user_id": 42, "prompt": "a paper fox", "width": 64, "height": 64}
TINY_STEPS = {**TINY, "num_inference_steps": 2}
RESPONSE_KEYS = {"job_id", "status", "image_url", "thumbnail_url", "generation_time", "error"}


def poll(client: httpx.Client | TestClient, job_id: str, timeout_s: float = 60) -> Any:
    """GET /dream/status until the job is completed or failed."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/dream/status/{job_id}")
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == RESPONSE_KEYS
        if body["status"] in ("completed", "failed") or time.monotonic() > deadline:
            return body
        assert body["status"] in ("queued", "processing")
        time.sleep(0.05)


def metric_samples(client: httpx.Client | TestClient) -> dict[str, float]:
    """Every unlabelled sample of the three Dream metrics, by sample name (buckets: name
    plus the bound, e.g. image_generation_duration_seconds_bucket+Inf)."""
    text = client.get("/metrics").text
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("image_generation_"):
            continue
        for sample in family.samples:
            samples[sample.name + sample.labels.get("le", "")] = sample.value
    return samples


def queue(client: httpx.Client | TestClient, **fields: Any) -> str:
    body = {key: value for key, value in {**TINY_STEPS, **fields}.items() if value is not None}
    response = client.post("/dream/generate", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


# -- the live service ----------------------------------------------------------------------


def test_queue_poll_and_fetch_the_image(live: LiveService) -> None:
    body = {
        **TINY_STEPS,
        "width": 320,
        "height": 192,
        "girl_id": "g-7",
        "context": "at the beach",
        "affection_level": 80,
        "high_quality": True,  # no refiner configured: runs without, as the original did
        "mood": {"happy": True},  # unknown to the original: kept in the metadata too
    }
    response = live.client.post("/dream/generate", json=body)
    assert response.status_code == 200, response.text
    queued = response.json()
    # Every key present, nulls included, as the original's response_model serialized it.
    assert queued == {
        "job_id": queued["job_id"],
        "status": "queued",
        "image_url": None,
        "thumbnail_url": None,
        "generation_time": None,
        "error": None,
    }
    done = poll(live.client, queued["job_id"])
    assert done["status"] == "completed", done
    assert done["error"] is None
    assert isinstance(done["generation_time"], float) and done["generation_time"] > 0
    image = Image.open(io.BytesIO(live.client.get(done["image_url"]).content))
    assert (image.format, image.size) == ("PNG", (320, 192))
    thumb = Image.open(io.BytesIO(live.client.get(done["thumbnail_url"]).content))
    assert thumb.format == "WEBP"
    assert max(thumb.size) == 256 and abs(thumb.size[1] - 192 * 256 / 320) <= 1
    # The native job: the fields the original only described are echoed in the metadata.
    job = live.client.get(f"/v1/jobs/{queued['job_id']}").json()
    assert job["spec"]["metadata"] == {
        "user_id": 42,
        "girl_id": "g-7",
        "context": "at the beach",
        "affection_level": 80,
        "mood": {"happy": True},
    }
    assert job["owner"] == "42"
    assert job["spec"]["steps"] == 2 and job["spec"]["guidance_scale"] == 7.5
    assert job["spec"]["high_quality"] is False


def test_unknown_job_is_404_with_the_originals_detail(live: LiveService) -> None:
    response = live.client.get("/dream/status/no-such-job")
    assert response.status_code == 404
    assert response.json() == {"detail": "Job not found"}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"priority": "whenever"}, "priority", ["urgent", "high", "normal", "whenever"]),
        ({"prompt": None}, "prompt", []),
        ({"user_id": None}, "user_id", []),
        ({"num_inference_steps": 0}, "num_inference_steps", ["1", "(got 0)"]),
        ({"num_inference_steps": 151}, "num_inference_steps", ["150"]),
        ({"guidance_scale": 31}, "guidance_scale", ["30"]),
        ({"affection_level": 101}, "affection_level", ["100"]),
        ({"width": 60}, "width", ["60", "multiple of 8"]),  # sdworker's own check
    ],
)
def test_bad_requests_are_422_naming_the_field(
    live: LiveService, fields: dict[str, Any], field: str, words: list[str]
) -> None:
    body = {key: value for key, value in {**TINY_STEPS, **fields}.items() if value is not None}
    response = live.client.post("/dream/generate", json=body)
    assert response.status_code == 422, response.text
    [detail] = response.json()["detail"]
    assert detail["loc"] == ["body", field], detail
    for word in words:
        assert word in detail["msg"], detail


def test_health_reports_the_ready_worker(live: LiveService) -> None:
    response = live.client.get("/dream/health")
    assert response.status_code == 200, response.text
    body = response.json()
    # The test harness's worker reports no device name (a served worker says "cpu").
    assert body.pop("device") in (None, "cpu")
    assert body == {
        "status": "healthy",
        "pipeline_loaded": True,
        "refiner_loaded": False,
        "gpu_available": False,
        "gpu_count": 0,
    }


@pytest.mark.parametrize(
    ("device", "reported"), [("cuda:1", "cuda"), ("cuda", "cuda"), ("cpu", "cpu"), ("", None)]
)
def test_health_names_the_device_type_as_the_original(device: str, reported: str | None) -> None:
    assert device_type(device) == reported


def test_metrics_move_with_jobs(live: LiveService) -> None:
    before = metric_samples(live.client)
    assert set(before) >= {
        "image_generation_requests_total",
        "image_generation_errors_total",
        "image_generation_duration_seconds_count",
        "image_generation_duration_seconds_sum",
        "image_generation_duration_seconds_bucket+Inf",
        "image_generation_duration_seconds_bucket60.0",
    }
    done = poll(live.client, queue(live.client))
    assert done["status"] == "completed", done
    after = metric_samples(live.client)
    assert after["image_generation_requests_total"] >= before["image_generation_requests_total"] + 1
    bucket = "image_generation_duration_seconds_bucket+Inf"
    assert after[bucket] >= before[bucket] + 1
    assert (
        after["image_generation_duration_seconds_bucket60.0"]
        > before["image_generation_duration_seconds_bucket60.0"]
    )
    assert (
        after["image_generation_duration_seconds_sum"]
        > before["image_generation_duration_seconds_sum"]
    )
    assert after["image_generation_errors_total"] == before["image_generation_errors_total"]


# -- in process, no worker: the test plays the worker through the broker --------------------


@pytest.fixture
def app_client(tmp_path: Path, cache_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, cache_dir=cache_dir, model="tiny-sdxl", device="cpu"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def services_of(client: TestClient) -> Services:
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    return services


def test_urgent_jobs_are_claimed_first(app_client: TestClient) -> None:
    normal = queue(app_client)
    urgent = queue(app_client, priority="URGENT")
    high = queue(app_client, priority="high")
    broker = services_of(app_client).broker
    claimed = [broker.claim("w"), broker.claim("w"), broker.claim("w")]
    assert [job.id for job in claimed if job] == [urgent, high, normal]
    assert poll(app_client, urgent, timeout_s=0)["status"] == "processing"


def test_the_originals_ranges_are_accepted(app_client: TestClient) -> None:
    for fields in (
        {"num_inference_steps": 20, "guidance_scale": 5.0, "nsfw_level": 0},
        {"num_inference_steps": 50, "guidance_scale": 15.0, "affection_level": 100},
        {"user_id": "user-abc", "girl_id": "g1", "priority": "normal"},
    ):
        job_id = queue(app_client, **fields)
        job = services_of(app_client).broker.get(job_id)
        assert job.spec.steps == fields.get("num_inference_steps", 2)
        assert job.spec.metadata["user_id"] == fields.get("user_id", 42)


def test_defaults_are_the_originals(app_client: TestClient) -> None:
    job_id = queue(app_client, num_inference_steps=None)
    spec = services_of(app_client).broker.get(job_id).spec
    assert (spec.steps, spec.guidance_scale, spec.priority.value) == (30, 7.5, "normal")
    assert spec.metadata == {"user_id": 42}  # only what the client sent is echoed


def test_failed_and_canceled_jobs(app_client: TestClient) -> None:
    broker = services_of(app_client).broker
    before = metric_samples(app_client)
    failing = queue(app_client)
    assert broker.claim("w") is not None
    broker.fail(failing, "w", JobError(code="engine_error", message="CUDA error: boom"))
    failed = poll(app_client, failing, timeout_s=0)
    assert failed == {
        "job_id": failing,
        "status": "failed",
        "image_url": None,
        "thumbnail_url": None,
        "generation_time": None,
        "error": "CUDA error: boom",
    }
    canceled = queue(app_client)
    broker.cancel(canceled)
    assert poll(app_client, canceled, timeout_s=0)["error"] == "canceled"
    after = metric_samples(app_client)
    assert after["image_generation_errors_total"] == before["image_generation_errors_total"] + 1
    # The exposed names, unlabelled as the original's docs define them.
    assert "\nimage_generation_errors_total 1.0\n" in app_client.get("/metrics").text
    requests = "image_generation_requests_total"
    assert after[requests] == before[requests] + 2


def test_health_is_503_while_no_worker_is_ready(app_client: TestClient) -> None:
    response = app_client.get("/dream/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] in ("starting", "unhealthy")
    assert body["pipeline_loaded"] is False and body["device"] is None


def test_at_the_root_the_native_health_answers(tmp_path: Path, cache_dir: Path) -> None:
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        cache_dir=cache_dir,
        model="tiny-sdxl",
        device="cpu",
        dialects={"dream": "/", "lcm": "off"},
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/generate", json=TINY_STEPS)
        assert response.status_code == 200, response.text
        assert client.get(f"/status/{response.json()['job_id']}").json()["status"] == "queued"
        assert "model_loaded" in client.get("/health").json()  # the native superset
