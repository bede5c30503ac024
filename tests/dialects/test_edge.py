"""The edge-function worker protocol against a live service and a real redis-server:
a producer LPUSHes job payloads to the list, the consumer queues them, the worker runs
them, and a real receiver gets the signed job-callback in that system's body."""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import shutil
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image
from standardwebhooks import Webhook

from sdworker.api.dialects.edge import accept_payload
from sdworker.edge_queue import (
    HANDOVER_ATTEMPTS,
    EdgeQueueConsumer,
    dead_letter_list,
    processing_list,
)
from sdworker.errors import InputImageError
from sdworker.jobs import Asset, Job, JobError, JobResult, JobSpec, JobStatus, JobTimings
from sdworker.settings import Settings
from sdworker.webhook_payloads import edge_payload_for
from tests.conftest import gradient_image
from tests.dialects.conftest import LiveService, live_service
from tests.redis_server import RedisServer, free_port
from tests.support.receiver import Receiver

SECRET = "whsec_" + base64.b64encode(b"edge-callback-secret-0123456789ab").decode()
TOKEN = "svc"
TINY = {"resolution": "64x64", "steps": 2}


def edge_settings(redis_url: str, queue: str, receiver: Receiver) -> dict[str, Any]:
    return {
        "edge_queue_url": redis_url,
        "edge_queue": queue,
        "edge_callback_url": receiver.url + "/functions/v1/job-callback",
        "edge_callback_token": TOKEN,
        "edge_poll_interval_s": 0.1,
        "webhook_secret": SECRET,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    item = Receiver()
    yield item
    item.close()


@pytest.fixture(scope="module")
def edge_engine(cache_dir: Path, tiny_folder: Path) -> Any:
    """The tiny engine, allowed to fetch reference images from the live service itself
    (the shared `engine` fixture's settings refuse loopback URLs)."""
    from sdworker.engine.engine import Engine

    return Engine(
        Settings(
            _env_file=None, cache_dir=cache_dir, device="cpu", model="tiny-sdxl",
            fetch_allow="127.0.0.1",
        )
    )  # fmt: skip


@pytest.fixture(scope="module")
def edge(
    tmp_path_factory: pytest.TempPathFactory,
    cache_dir: Path,
    edge_engine: Any,
    redis_server: RedisServer,
    receiver: Receiver,
) -> Iterator[LiveService]:
    """One live service consuming this module's own list."""
    overrides = edge_settings(redis_server.url, "edge-test:main", receiver)
    folder = tmp_path_factory.mktemp("edge")
    with live_service(folder, cache_dir, edge_engine, **overrides) as svc:
        yield svc


@pytest.fixture(scope="module")
def producer(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def payload(**changes: Any) -> dict[str, Any]:
    """A payload as the edge function queues it, with fields this dialect ignores."""
    body: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "type": "sdxl_image_fast",
        "prompt": "a lighthouse at dusk",
        "user_id": "user-1",
        "config": {**TINY, "num_images": 1, "frame_num": 1, "expected_time": 5},
        "metadata": {"contentType": "sfw", "credits": 1},
        "model_variant": "lustify_sdxl",
        "bucket": "sdxl_image_fast",
        "created_at": "2025-08-31T12:00:00Z",
    }
    return body | changes


def callbacks_for(receiver: Receiver, edge_id: str, count: int = 1, timeout_s: float = 60) -> list:
    """The verified callback bodies for one edge job id, once `count` have arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [call for call in receiver.calls if json.loads(call["body"])["job_id"] == edge_id]
        if len(found) >= count:
            return [verified(call) for call in found]
        assert time.monotonic() < deadline, f"no callback for {edge_id}"
        time.sleep(0.05)


def verified(call: dict[str, Any]) -> dict[str, Any]:
    """The body after checking the signature (Standard Webhooks) and the bearer token."""
    assert call["path"] == "/functions/v1/job-callback"
    headers = {name.lower(): value for name, value in call["headers"].items()}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    body: dict[str, Any] = Webhook(SECRET).verify(call["body"], headers)
    return body


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    response = client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def wait_until_empty(client: redis.Redis, *keys: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while any(client.llen(key) for key in keys):
        assert time.monotonic() < deadline, {key: client.lrange(key, 0, -1) for key in keys}
        time.sleep(0.05)


def test_a_queued_payload_becomes_a_signed_callback_with_three_images(
    edge: LiveService, receiver: Receiver, producer: redis.Redis
) -> None:
    job = payload(config={**TINY, "num_images": 3, "seed": 77, "negative_prompt": "blurry"})
    producer.lpush("edge-test:main", json.dumps(job))
    (body,) = callbacks_for(receiver, job["id"])

    assert body["status"] == "completed"
    assert body["error_message"] is None
    assert body["worker_id"] == "dialect-worker"
    meta = body["metadata"]
    assert meta["job_type"] == "sdxl_image_fast"
    assert meta["seed"] == 77
    assert meta["num_images"] == meta["batch_size"] == 3
    assert meta["reference_mode"] == "none"
    assert meta["enhancement_source"] == "none"
    assert meta["processing_time"] > 0
    assets = body["assets"]
    assert [a["metadata"]["seed"] for a in assets] == [77, 78, 79]
    assert [a["metadata"]["asset_index"] for a in assets] == [0, 1, 2]
    images = []
    for asset in assets:
        assert asset["type"] == "image"
        assert f"/user-1/{meta['sdworker_job_id']}/" in asset["url"]
        assert asset["metadata"]["width"] == asset["metadata"]["height"] == 64
        assert asset["metadata"]["steps"] == 2
        assert asset["metadata"]["negative_prompt_used"] is True
        images.append(pixels(edge.client, asset["url"]))
        thumb = edge.client.get(asset["thumbnail_url"])
        assert thumb.headers["content-type"] == "image/webp"
    assert not np.array_equal(images[0], images[1])
    wait_until_empty(producer, "edge-test:main", processing_list("edge-test:main"))

    # Image 1 alone from seed 78 (over HTTP this time) is image 1 of the batch.
    alone = payload(config={**TINY, "seed": 78, "negative_prompt": "blurry"})
    response = edge.client.post("/edge/jobs", json=alone)
    assert response.status_code == 202, response.text
    (again,) = callbacks_for(receiver, alone["id"])
    assert again["assets"][0]["metadata"]["seed"] == 78
    difference = np.abs(pixels(edge.client, again["assets"][0]["url"]) - images[1])
    assert difference.mean() < 1.0


def test_img2img_from_a_data_uri_then_from_a_url_with_the_legacy_strength(
    edge: LiveService, receiver: Receiver, producer: redis.Redis
) -> None:
    buffer = io.BytesIO()
    gradient_image(64, 64).save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    job = payload(
        metadata={"reference_image_url": data_uri, "denoise_strength": 0.5, "x": 1},
        config={**TINY, "seed": 5},
    )
    producer.lpush("edge-test:main", json.dumps(job))
    (body,) = callbacks_for(receiver, job["id"])
    assert body["status"] == "completed", body
    assert body["metadata"]["reference_mode"] == "composition"
    described = body["assets"][0]["metadata"]
    assert described["pipeline"] == "img2img"
    assert described["denoise_strength"] == 0.5
    assert described["resize_policy"] == "center_crop"

    # The output as the next reference, by URL (the service fetches it from itself).
    url = body["assets"][0]["url"]
    legacy = payload(metadata={"reference_image_url": url, "reference_strength": 0.6})
    response = edge.client.post("/edge/jobs", json=legacy)
    # 2 steps x strength 0.4 runs no step: refused, naming the field that was given.
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "metadata", "reference_strength"]
    legacy["config"] = {**TINY, "steps": 3}
    response = edge.client.post("/edge/jobs", json=legacy)
    assert response.status_code == 202, response.text
    (second,) = callbacks_for(receiver, legacy["id"])
    assert second["status"] == "completed", second["error_message"]
    assert second["assets"][0]["metadata"]["denoise_strength"] == pytest.approx(0.4)

    # A reference the service may not fetch fails the job, naming the payload's field.
    refused = payload(metadata={"reference_image_url": "http://169.254.169.254/a.png"})
    producer.lpush("edge-test:main", json.dumps(refused))
    (third,) = callbacks_for(receiver, refused["id"])
    assert third["status"] == "failed"
    assert third["error_message"].startswith("metadata.reference_image_url: refused")


def test_bad_payloads_get_a_failed_callback_and_leave_nothing_behind(
    edge: LiveService, receiver: Receiver, producer: redis.Redis
) -> None:
    two = payload(config={**TINY, "num_images": 2})
    steps = payload(config={"resolution": "64x64", "num_inference_steps": 500})
    video = payload(type="video_fast")
    producer.lpush("edge-test:main", "not json {", json.dumps(two))
    producer.lpush("edge-test:main", json.dumps(steps), json.dumps(video))

    (body,) = callbacks_for(receiver, two["id"])
    assert body["status"] == "failed"
    assert body["assets"] == []
    assert "config.num_images" in body["error_message"]
    assert "1, 3 or 6" in body["error_message"]
    (body,) = callbacks_for(receiver, steps["id"])
    assert body["error_message"].startswith("config.num_inference_steps:")
    (body,) = callbacks_for(receiver, video["id"])
    assert "type" in body["error_message"] and "sdxl_image_high" in body["error_message"]
    wait_until_empty(producer, "edge-test:main", processing_list("edge-test:main"))


def test_the_same_payload_twice_is_one_job(
    edge: LiveService, receiver: Receiver, producer: redis.Redis
) -> None:
    job = json.dumps(payload(config={**TINY, "seed": 9}))
    edge_id = json.loads(job)["id"]
    producer.lpush("edge-test:main", job, job)
    callbacks_for(receiver, edge_id)
    wait_until_empty(producer, "edge-test:main", processing_list("edge-test:main"))
    time.sleep(0.5)  # a second job would have called back by now
    assert len(callbacks_for(receiver, edge_id)) == 1
    jobs = edge.client.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
    mine = [j for j in jobs if j["spec"]["metadata"].get("edge", {}).get("job_id") == edge_id]
    assert len(mine) == 1
    # Pushed again after it ended (its callback lost, say): the same job calls back again.
    producer.lpush("edge-test:main", job)
    first, second = callbacks_for(receiver, edge_id, count=2)
    assert second["metadata"]["sdworker_job_id"] == first["metadata"]["sdworker_job_id"]
    assert second["assets"] == first["assets"]


def test_http_submit_status_and_errors(edge: LiveService, receiver: Receiver) -> None:
    job = payload(config={**TINY, "seed": 3}, compel_enabled=True, compel_weights="(red:1.2)")
    response = edge.client.post("/edge/jobs", json=job)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["job_id"] == job["id"] and accepted["status"] == "queued"
    (body,) = callbacks_for(receiver, job["id"])
    assert body["metadata"]["compel_enhancement"] is True
    assert body["metadata"]["sdworker_job_id"] == accepted["sdworker_job_id"]
    # The same payload again: the same job, now completed; its state in the callback body.
    again = edge.client.post("/edge/jobs", json=job).json()
    assert again == accepted | {"status": "completed"}
    state = edge.client.get(f"/edge/jobs/{accepted['sdworker_job_id']}").json()
    assert state["status"] == "completed" and len(state["assets"]) == 1

    bad = edge.client.post("/edge/jobs", json=payload(config={"num_images": 2}))
    assert bad.status_code == 422
    detail = bad.json()["detail"][0]
    assert detail["loc"] == ["body", "config", "num_images"]
    assert "1, 3 or 6" in detail["msg"]
    no_id = payload()
    del no_id["id"]
    assert edge.client.post("/edge/jobs", json=no_id).json()["detail"][0]["loc"] == ["body", "id"]
    big = edge.client.post("/edge/jobs", json=payload(config={"resolution": "64x64", "steps": 0}))
    assert big.status_code == 422 and big.json()["detail"][0]["loc"] == ["body", "config", "steps"]
    assert edge.client.get("/edge/jobs/01NOSUCHJOB").status_code == 404


def test_status_and_health_have_the_worker_fields(edge: LiveService) -> None:
    status = edge.client.get("/edge/status").json()
    assert status["worker_type"] == "sdworker"
    assert status["batch_support"] is True
    assert status["quality_tiers"] == ["sdxl_image_fast", "sdxl_image_high"]
    assert status["i2i_pipeline"] is True and status["thumbnail_generation"] is True
    assert status["model"] == "tiny-sdxl"
    health = edge.client.get("/edge/health").json()
    assert {"status", "model_loaded", "device"} <= set(health)


def test_an_item_left_in_processing_by_a_crash_is_redriven_at_start(
    make_live: Callable[..., LiveService], redis_server: RedisServer, producer: redis.Redis
) -> None:
    receiver = Receiver()
    try:
        queue = "edge-test:redrive"
        job = payload(config={**TINY, "seed": 11})
        producer.lpush(processing_list(queue), json.dumps(job))  # taken, never queued
        make_live(**edge_settings(redis_server.url, queue, receiver))
        (body,) = callbacks_for(receiver, job["id"])
        assert body["status"] == "completed"
        wait_until_empty(producer, queue, processing_list(queue))
    finally:
        receiver.close()


def test_edge_payload_of_a_canceled_job_and_keys_as_urls() -> None:
    spec = JobSpec(
        prompt="x",
        metadata={"user_id": "u", "edge": {"job_id": "e-1", "type": "sdxl_image_high"}},
        webhook_format="edge",
    )
    now = datetime.now(UTC)
    job = Job(
        id="J1", status=JobStatus.CANCELED, spec=spec, priority=spec.priority, owner="u",
        created_at=now, error=JobError(code="canceled", message="canceled by a client"),
    )  # fmt: skip
    body = edge_payload_for(job, Settings(_env_file=None))
    assert (body["job_id"], body["status"], body["error_message"]) == ("e-1", "failed", "canceled")
    assert body["metadata"]["job_type"] == "sdxl_image_high"

    asset = Asset(
        key="u/J2/0.png", url="http://h/v1/assets/u/J2/0.png", thumbnail_key="u/J2/0.thumb.webp",
        thumbnail_url="http://h/t", content_type="image/png",
        metadata={"width": 8, "height": 8, "seed": 4, "pipeline": "text2img"},
    )  # fmt: skip
    result = JobResult(assets=[asset], seeds=[4], model="m", device="cpu", timings=JobTimings())
    done = job.model_copy(update={"id": "J2", "status": JobStatus.SUCCEEDED, "result": result})
    body = edge_payload_for(done, Settings(_env_file=None, edge_asset_urls="key"))
    assert body["assets"][0]["url"] == "u/J2/0.png"
    assert body["assets"][0]["thumbnail_url"] == "u/J2/0.thumb.webp"
    assert "pipeline" not in body["assets"][0]["metadata"]


class Collector:
    def __init__(self) -> None:
        self.items: list[bytes] = []
        self.got = threading.Event()

    def __call__(self, raw: bytes) -> None:
        self.items.append(raw)
        self.got.set()


def consumer_settings(url: str, queue: str) -> Settings:
    return Settings(_env_file=None, edge_queue_url=url, edge_queue=queue, edge_poll_interval_s=0.05)


def test_the_consumer_rides_out_redis_being_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    collect = Collector()
    consumer = EdgeQueueConsumer(consumer_settings(f"redis://127.0.0.1:{port}/0", "q"), collect)
    server = None
    with caplog.at_level(logging.WARNING, logger="sdworker.edge_queue"):
        consumer.start()
        try:
            time.sleep(0.5)  # polling a port where nothing listens
            assert "edge queue unreachable" in caplog.text
            server = RedisServer(tmp_path / "late", port=port)
            client = redis.Redis.from_url(server.url)
            client.lpush("q", b"first", b"second")
            deadline = time.monotonic() + 15
            while len(collect.items) < 2:
                assert time.monotonic() < deadline, "the consumer did not come back"
                time.sleep(0.05)
            assert collect.items == [b"first", b"second"]  # LPUSH, taken at the right: FIFO
            wait_until_empty(client, "q", processing_list("q"))
            client.close()
        finally:
            consumer.stop()
            if server is not None:
                server.stop()


def test_a_failing_handover_stays_in_processing_and_is_retried(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    failures = [RuntimeError("job queue down")]
    seen: list[bytes] = []

    def handle(raw: bytes) -> None:
        seen.append(raw)
        if failures:
            raise failures.pop()

    consumer = EdgeQueueConsumer(consumer_settings(redis_server.url, "edge-test:retry"), handle)
    client.lpush("edge-test:retry", b"job")
    assert consumer.poll_once() == 0
    assert client.lrange(processing_list("edge-test:retry"), 0, -1) == [b"job"]
    assert consumer.poll_once() == 1
    assert seen == [b"job", b"job"]
    wait_until_empty(client, "edge-test:retry", processing_list("edge-test:retry"))
    consumer.stop()
    client.close()


def test_an_item_that_keeps_failing_goes_to_the_dead_letter_list(
    redis_server: RedisServer,
) -> None:
    queue = "edge-test:poison"
    client = redis.Redis.from_url(redis_server.url)
    seen: list[bytes] = []

    def handle(raw: bytes) -> None:
        seen.append(raw)
        if raw == b"poison":
            raise RecursionError("a payload that trips a bug")

    consumer = EdgeQueueConsumer(consumer_settings(redis_server.url, queue), handle)
    client.lpush(queue, b"poison", b"good")
    for _ in range(HANDOVER_ATTEMPTS - 1):
        assert consumer.poll_once() == 0  # retried, holding up nothing else yet
    assert client.lrange(dead_letter_list(queue), 0, -1) == []
    assert consumer.poll_once() == 2  # the last failure moves it aside, "good" goes on
    assert seen == [b"poison"] * HANDOVER_ATTEMPTS + [b"good"]
    assert client.lrange(dead_letter_list(queue), 0, -1) == [b"poison"]
    wait_until_empty(client, queue, processing_list(queue))
    consumer.stop()
    client.close()


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM), made with `cryptography`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_the_consumer_speaks_tls(tmp_path: Path) -> None:
    """rediss:// (as Upstash gives): a TLS-only redis-server with a self-signed cert,
    trusted through the URL's ssl_ca_certs."""
    cert, key = self_signed(tmp_path)
    port = free_port()
    binary = shutil.which("redis-server")
    assert binary is not None
    process = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-auth-clients", "no", "--bind", "127.0.0.1",
         "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except (redis.ConnectionError, ssl.SSLError):
                assert time.monotonic() < deadline, "the TLS redis-server did not start"
                time.sleep(0.05)
        collect = Collector()
        consumer = EdgeQueueConsumer(consumer_settings(url, "tls"), collect)
        consumer.start()
        client.lpush("tls", json.dumps({"id": "x"}))
        assert collect.got.wait(10)
        consumer.stop()
        assert collect.items == [b'{"id": "x"}']
        client.close()
    finally:
        process.terminate()
        process.wait(10)


def test_a_redriven_payload_is_its_job_even_when_its_reference_is_gone(
    make_client: Any, tmp_path: Path
) -> None:
    """After a crash, the item is handed over again: the job exists, so it is that job,
    not a refusal because the (signed, expiring) reference URL no longer answers."""
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    gradient_image(64, 64).save(tmp_path / "ref.png")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/ref.png"
    client = make_client(fetch_allow="127.0.0.1")  # no worker: the job stays queued
    services = client.app.state.services
    job = payload(metadata={"reference_image_url": url, "denoise_strength": 0.5})
    try:
        _, first, created = accept_payload(job, services)
        assert created
    finally:
        server.shutdown()
        server.server_close()
    _, again, created = accept_payload(job, services)  # the URL is gone now
    assert (again.id, created) == (first.id, False)
    changed = payload(id=job["id"], prompt="something else")
    with pytest.raises(InputImageError):  # a different payload is checked (and refused)
        accept_payload(changed | {"metadata": job["metadata"]}, services)
