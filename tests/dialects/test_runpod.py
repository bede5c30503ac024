"""RunPod: the serverless handler driven by the runpod SDK (rp_job.run_job, its local
test API), and the HTTP dialect driven by the SDK's `runpod.Endpoint` and plain HTTP
against a live service: queued and sync runs, status, cancel, health, errors, URLs."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import requests
import runpod
from fastapi.testclient import TestClient
from PIL import Image
from runpod.serverless.modules import rp_fastapi, rp_job

from sdworker import runpod_handler
from sdworker.api.dialects.runpod_format import parse_input, spec_fields
from sdworker.errors import InvalidJobError
from sdworker.runpod_handler import make_handler
from sdworker.settings import Settings
from tests.conftest import gradient_image, max_pixel_difference
from tests.dialects.conftest import LiveService
from tests.redis_server import free_port
from tests.support.receiver import Receiver
from tests.support.s3_server import s3_endpoint

TINY = {"prompt": "a paper fox", "width": 64, "height": 64, "num_inference_steps": 2}
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def uri_bytes(uri: str, content_type: str = "image/png") -> bytes:
    prefix = f"data:{content_type};base64,"
    assert uri.startswith(prefix), uri[:60]
    return base64.b64decode(uri.removeprefix(prefix))


def decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(uri_bytes(uri)))


def run_job(handler: Handler, job_input: Any, job_id: str = "t1") -> dict[str, Any]:
    """The SDK's own job runner, as a RunPod worker calls the handler."""
    result: dict[str, Any] = asyncio.run(
        rp_job.run_job(handler, {"id": job_id, "input": job_input})
    )
    return result


def handler_settings(data_dir: Path, cache_dir: Path, **overrides: Any) -> Settings:
    values = {"data_dir": data_dir, "cache_dir": cache_dir, "model": "tiny-sdxl", "device": "cpu"}
    return Settings(_env_file=None, **(values | overrides))


@pytest.fixture(scope="module")
def handler(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, engine: Any) -> Handler:
    data_dir = tmp_path_factory.mktemp("runpod-handler")
    return make_handler(handler_settings(data_dir, cache_dir), engine=engine)


# -- translation ---------------------------------------------------------------------------


def test_input_translation_aliases_owner_and_refiner() -> None:
    refiner = {"high_noise_frac": 0.7, "refiner_inference_steps": 5}
    data = parse_input(
        {"prompt": "p", "steps": 9, "num_outputs": 3, "user_id": 42, "file_uid": "f", **refiner}
    )
    with_refiner = spec_fields(data, refiner_available=True)
    assert with_refiner["steps"] == 9 and with_refiner["num_images"] == 3
    assert with_refiner["metadata"] == {
        "use_cloud_storage": False,
        "user_id": "42",
        "file_uid": "f",
    }
    assert with_refiner["refiner"] == "ensemble" and with_refiner["high_noise_frac"] == 0.7
    assert with_refiner["refiner_inference_steps"] == 5
    # Without a refiner on the server the refiner fields are kept but ask for nothing.
    plain = spec_fields(data, refiner_available=False)
    assert "refiner" not in plain and plain["high_noise_frac"] == 0.7
    with pytest.raises(InvalidJobError, match="num_images=1 and num_outputs=2 disagree"):
        spec_fields(parse_input({"num_images": 1, "num_outputs": 2}), refiner_available=False)


def test_main_starts_the_sdk_with_a_lazy_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(runpod.serverless, "start", started.append)
    runpod_handler.main()  # builds nothing yet: no settings read, no model loaded
    [config] = started
    assert callable(config["handler"]) and set(config) == {"handler"}


# -- the serverless handler --------------------------------------------------------------


def test_handler_text2img_gives_data_uris_and_seed_plus_i(handler: Handler) -> None:
    job_input = {**TINY, "seed": 7, "num_images": 2, "user_id": "alice", "file_uid": "f-1"}
    result = run_job(handler, job_input)
    assert "error" not in result, result
    output = result["output"]
    assert output["seed"] == 7 and output["seeds"] == [7, 8]
    assert output["file_uid"] == "f-1"
    assert len(output["images"]) == 2 and output["image_url"] == output["images"][0]
    images = [decode(uri) for uri in output["images"]]
    assert all(image.size == (64, 64) and image.format == "PNG" for image in images)
    assert "Seed: 8" in images[1].info["parameters"]
    # Image i uses seed + i: the second image comes back alone from seed 8.
    alone = run_job(handler, {**TINY, "seed": 8, "num_outputs": 1})["output"]
    assert alone["seeds"] == [8]
    assert max_pixel_difference(decode(alone["image_url"]), images[1]) <= 2


def test_handler_img2img_from_a_data_uri(handler: Handler) -> None:
    job_input = {
        **TINY,
        "steps": 4,
        "num_inference_steps": None,
        "image_url": png_data_uri(gradient_image(64, 64)),
        "strength": 0.5,
        "seed": 3,
        "scheduler": "K_EULER",
    }
    output = run_job(handler, job_input)["output"]
    image = decode(output["image_url"])
    assert image.size == (64, 64)
    parameters = image.info["parameters"]
    assert "Denoising strength: 0.5" in parameters and "Sampler: Euler," in parameters
    assert "Steps: 4" in parameters
    text2img = run_job(handler, {**TINY, "seed": 3})["output"]
    assert max_pixel_difference(decode(text2img["image_url"]), image) > 10


def test_handler_bad_input_is_an_error_naming_the_field(handler: Handler) -> None:
    unknown = run_job(handler, {**TINY, "sampler": "euler"})
    assert "output" not in unknown
    assert "Unexpected input. sampler is not a valid input option" in unknown["error"]
    assert "scheduler" in unknown["error"]  # the valid options are listed
    odd = run_job(handler, {**TINY, "width": 60})
    assert odd["error"].startswith("width: 60 is not allowed")
    steps = run_job(handler, {**TINY, "num_inference_steps": 500})
    assert steps["error"].startswith("num_inference_steps:")
    both = run_job(handler, {**TINY, "steps": 3})
    assert "num_inference_steps=2 and steps=3 disagree" in both["error"]
    assert run_job(handler, "a prompt")["error"].startswith("input must be a JSON object")
    scheduler = run_job(handler, {**TINY, "scheduler": "nope"})
    assert "K_EULER_ANCESTRAL" in scheduler["error"]
    # No cloud storage is configured on this worker: asking for URLs is refused.
    cloud = run_job(handler, {**TINY, "use_cloud_storage": True})
    assert cloud["error"].startswith("use_cloud_storage:")


def test_the_sdk_local_test_api_runs_the_handler(handler: Handler) -> None:
    client = TestClient(rp_fastapi.WorkerAPI({"handler": handler}).rp_app)
    body = client.post("/runsync", json={"input": {**TINY, "seed": 11}}).json()
    assert body["status"] == "COMPLETED", body
    assert body["output"]["seeds"] == [11]
    assert decode(body["output"]["image_url"]).size == (64, 64)
    failed = client.post("/runsync", json={"input": {**TINY, "task_type": "upscale"}}).json()
    assert failed["status"] == "FAILED" and failed["error"].startswith("task_type:")


def test_handler_cloud_storage_gives_urls_to_the_same_bytes(
    tmp_path: Path, cache_dir: Path, engine: Any, handler: Handler, s3_endpoint: str
) -> None:
    settings = handler_settings(
        tmp_path, cache_dir, s3_bucket="outputs", s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1", s3_access_key_id="k", s3_secret_access_key="s",
    )  # fmt: skip
    cloud = make_handler(settings, engine=engine)
    output = run_job(cloud, {**TINY, "seed": 5, "use_cloud_storage": True, "user_id": "bob"})
    output = output["output"]
    [url] = output["images"]
    assert url.startswith(s3_endpoint) and "/bob/" in url and "X-Amz-Signature=" in url
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    inline = run_job(handler, {**TINY, "seed": 5, "user_id": "bob"})["output"]
    assert fetched.content == uri_bytes(inline["image_url"])
    # Inline answers keep nothing in the bucket.
    inline_cloud = run_job(cloud, {**TINY, "seed": 6})["output"]
    assert inline_cloud["image_url"].startswith("data:image/png;base64,")
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="k", aws_secret_access_key="s",
    )  # fmt: skip
    # (moto keeps one store per process: other modules' objects may be there too)
    keys = [item["Key"] for item in s3.list_objects_v2(Bucket="outputs")["Contents"]]
    assert any(key.startswith("bob/") for key in keys), keys
    assert not any(key.startswith("anonymous/") for key in keys), keys


def test_handler_text2video_gives_an_mp4(tmp_path: Path, cache_dir: Path) -> None:
    from tests.test_video import decode as decode_video

    settings = handler_settings(
        tmp_path, cache_dir, video_model="tiny-wan", register_video_model=True
    )
    video = make_handler(settings)
    job_input = {"prompt": "a corgi", "task_type": "text2video", "num_frames": 16, "fps": 8,
                 "width": 64, "height": 64, "num_inference_steps": 2, "seed": 4}  # fmt: skip
    output = run_job(video, job_input)["output"]
    assert output["seed"] == 4 and output["videos"] == [output["video_url"]]
    info = output["video_info"]
    assert info == {"frames": 16, "width": 64, "height": 64, "fps": 8, "duration_seconds": 2.0}
    frames, meta = decode_video(uri_bytes(output["video_url"], "video/mp4"))
    assert frames.shape == (16, 64, 64, 3) and meta["fps"] == 8.0


# -- the HTTP dialect ----------------------------------------------------------------------


def poll(live: LiveService, job_id: str, until: set[str], timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        body: dict[str, Any] = live.client.get(f"/runpod/status/{job_id}").json()
        if body["status"] in until or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_run_then_status_polling(live: LiveService, handler: Handler) -> None:
    queued = live.client.post("/runpod/run", json={"input": {**TINY, "seed": 21}})
    assert queued.status_code == 200, queued.text
    assert queued.json()["status"] == "IN_QUEUE"
    job_id = queued.json()["id"]
    body = poll(live, job_id, {"COMPLETED", "FAILED"})
    assert body["status"] == "COMPLETED", body
    assert body["id"] == job_id and body["output"]["seeds"] == [21]
    assert isinstance(body["delayTime"], int) and body["executionTime"] > 0
    # POST /status answers the same; the HTTP dialect and the handler give the same PNG.
    again = live.client.post(f"/runpod/status/{job_id}").json()
    assert again["output"] == body["output"]
    direct = run_job(handler, {**TINY, "seed": 21})["output"]
    assert uri_bytes(direct["image_url"]) == uri_bytes(body["output"]["image_url"])


def test_runsync_completes_and_counts_in_health(live: LiveService) -> None:
    before = live.client.get("/runpod/health").json()["jobs"]
    body = {"input": {**TINY, "seed": 30, "num_images": 2, "file_uid": "u-9"}}
    reply = live.client.post("/runpod/runsync", json=body).json()
    assert reply["status"] == "COMPLETED", reply
    output = reply["output"]
    assert output["seeds"] == [30, 31] and output["file_uid"] == "u-9"
    assert [decode(uri).size for uri in output["images"]] == [(64, 64), (64, 64)]
    health = live.client.get("/runpod/health").json()
    assert health["jobs"]["completed"] == before["completed"] + 1
    assert set(health["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert health["workers"]["idle"] + health["workers"]["running"] == 1


def test_runsync_that_outlasts_its_wait_answers_in_progress(live: LiveService) -> None:
    body = {"input": {**TINY, "width": 512, "height": 512, "num_inference_steps": 30}}
    reply = live.client.post("/runpod/runsync?wait=50", json=body).json()
    assert reply["status"] in {"IN_QUEUE", "IN_PROGRESS"} and "output" not in reply
    cancel = live.client.post(f"/runpod/cancel/{reply['id']}").json()
    assert cancel == {"id": reply["id"], "status": "CANCELLED"}
    assert poll(live, reply["id"], {"CANCELLED"})["status"] == "CANCELLED"


def test_cancel_stops_a_running_job(live: LiveService) -> None:
    body = {"input": {**TINY, "width": 512, "height": 512, "num_inference_steps": 100}}
    job_id = live.client.post("/runpod/run", json=body).json()["id"]
    assert poll(live, job_id, {"IN_PROGRESS"})["status"] == "IN_PROGRESS"
    started = time.monotonic()
    reply = live.client.post(f"/runpod/cancel/{job_id}")
    assert reply.json() == {"id": job_id, "status": "CANCELLED"}
    final = poll(live, job_id, {"CANCELLED", "COMPLETED", "FAILED"})
    assert final["status"] == "CANCELLED" and "output" not in final
    assert final["executionTime"] > 0  # it was running when cancelled
    assert time.monotonic() - started < 20  # stopped at a step, not run to the end


def test_bad_input_is_a_400_and_never_queued(live: LiveService) -> None:
    before = live.client.get("/runpod/health").json()["jobs"]
    cases = {
        "width": {**TINY, "width": 60},
        "sampler": {**TINY, "sampler": "euler"},
        "num_inference_steps": {**TINY, "num_inference_steps": 0},
        # schema-valid, refused by validation: an input image that cannot be fetched
        "image_url": {**TINY, "image_url": f"http://127.0.0.1:{free_port()}/in.png"},
        "task_type": {**TINY, "task_type": "upscale"},
    }
    for field, job_input in cases.items():
        for path in ("/runpod/run", "/runpod/runsync"):
            reply = live.client.post(path, json={"input": job_input})
            assert reply.status_code == 400, (field, reply.text)
            assert set(reply.json()) == {"error"} and field in reply.json()["error"], reply.text
    missing = live.client.post("/runpod/run", json={"prompt": "no input"})
    assert missing.status_code == 400 and "input" in missing.json()["error"]
    webhook = live.client.post("/runpod/run", json={"input": TINY, "webhook": "ftp://x"})
    assert webhook.status_code == 400 and "webhook" in webhook.json()["error"]
    after = live.client.get("/runpod/health").json()["jobs"]
    assert after["inQueue"] + after["inProgress"] + after["completed"] + after["failed"] == (
        before["inQueue"] + before["inProgress"] + before["completed"] + before["failed"]
    )
    unknown = live.client.get("/runpod/status/no-such-job")
    assert unknown.status_code == 404 and "no-such-job" in unknown.json()["error"]


def test_cloud_storage_answers_urls_that_fetch_the_same_bytes(live: LiveService) -> None:
    body = {"input": {**TINY, "seed": 44, "use_cloud_storage": True, "user_id": "carol"}}
    urls = live.client.post("/runpod/runsync", json=body).json()["output"]
    [url] = urls["images"]
    assert url.startswith(live.url) and "/carol/" in url
    inline = live.client.post("/runpod/runsync", json={"input": {**TINY, "seed": 44}}).json()
    assert httpx.get(url).content == uri_bytes(inline["output"]["image_url"])


def test_a_run_webhook_gets_the_native_body(live: LiveService) -> None:
    receiver = Receiver()
    try:
        body = {"input": {**TINY, "seed": 2}, "webhook": receiver.url + "/hook"}
        job_id = live.client.post("/runpod/run", json=body).json()["id"]
        assert poll(live, job_id, {"COMPLETED"})["status"] == "COMPLETED"
        deadline = time.monotonic() + 10
        while not receiver.calls and time.monotonic() < deadline:
            time.sleep(0.05)
        [call] = receiver.calls
        assert call["path"] == "/hook" and "webhook-id" in call["headers"]
        payload = json.loads(call["body"])
        assert payload["type"] == "job.completed" and payload["job_id"] == job_id
    finally:
        receiver.close()


def test_the_runpod_sdk_endpoint_against_the_service(
    live: LiveService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runpod, "api_key", "unused")
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{live.url}/runpod")
    endpoint = runpod.Endpoint("sdxl-endpoint")
    output = endpoint.run_sync({**TINY, "seed": 50}, timeout=60)
    assert output["seeds"] == [50] and decode(output["image_url"]).size == (64, 64)
    job = endpoint.run({"input": {**TINY, "seed": 51, "num_images": 2}})
    result = job.output(timeout=60)
    assert job.status() == "COMPLETED" and result["seeds"] == [51, 52]
    health = endpoint.health()
    assert health["jobs"]["completed"] >= 2
    long = endpoint.run({**TINY, "width": 512, "height": 512, "num_inference_steps": 100})
    assert long.cancel()["status"] == "CANCELLED"
    with pytest.raises(requests.HTTPError, match="400"):
        endpoint.run({**TINY, "width": 60})


def test_at_the_root_the_routes_answer_and_health_is_native(
    make_live: Callable[..., LiveService],
) -> None:
    root = make_live(dialects={"runpod": "/", "a1111": "off", "openai": "off"})
    reply = root.client.post("/runsync", json={"input": {**TINY, "seed": 60}}).json()
    assert reply["status"] == "COMPLETED" and reply["output"]["seeds"] == [60]
    assert root.client.get(f"/status/{reply['id']}").json()["status"] == "COMPLETED"
    assert "jobs" not in root.client.get("/health").json()  # the native one
    assert root.client.post("/any-endpoint/run", json={"input": TINY}).status_code == 404


__all__ = ["s3_endpoint"]  # the shared S3 server fixture
