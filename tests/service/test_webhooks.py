"""Webhooks against a real HTTP receiver on loopback, signatures checked by an
independent implementation of the Standard Webhooks scheme."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from sdworker.broker.sqlite import SqliteBroker
from sdworker.jobs import EventType, JobSpec, JobStatus
from sdworker.settings import Settings
from sdworker.storage.local import LocalStorage
from sdworker.webhooks import WebhookSender, retry_delay
from sdworker.worker import Worker
from tests.service.test_worker import FakeEngine
from tests.support.receiver import Receiver

KEY = b"0123456789abcdef0123456789abcdef"
SECRETS = ["whsec_" + base64.b64encode(KEY).decode(), "plain-old-secret"]


def expected_signature(secret: bytes, message_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks, written out from the spec (not from the library sdworker uses)."""
    digest = hmac.new(secret, f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(digest.digest()).decode()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    item = Receiver()
    yield item
    item.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Settings, SqliteBroker]]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, fetch_allow="127.0.0.1",
        webhook_secret=",".join(SECRETS),
        webhook_retry_base_s=0.01, webhook_max_attempts=5, progress_interval_s=0,
        webhook_progress_interval_s=0, poll_interval_s=0.02,
    )  # fmt: skip
    broker = SqliteBroker(settings.database_path)
    yield settings, broker
    broker.close()


def run_job(setup: Any, spec: JobSpec, *, sleeps: list[float] | None = None) -> str:
    settings, broker = setup
    recorded = sleeps if sleeps is not None else []
    sender = WebhookSender(settings, broker, sleep=recorded.append)
    worker = Worker(
        settings, broker, LocalStorage(settings.assets_dir, "http://api"), FakeEngine(), "w1",
        webhooks=sender,
    )  # fmt: skip
    job, _ = broker.enqueue(spec)
    worker.run_once()
    sender.close()
    return job.id


def test_retries_until_delivered_with_one_id_and_valid_signatures(
    setup: Any, receiver: Receiver
) -> None:
    receiver.script = [(500, {}), (503, {}), (200, {})]
    job_id = run_job(
        setup, JobSpec(prompt="x", size="64x64", steps=2, seed=5, webhook=receiver.url + "/hook")
    )
    assert len(receiver.calls) == 3
    ids = {call["headers"]["webhook-id"] for call in receiver.calls}
    assert ids == {f"{job_id}.completed"}
    for call in receiver.calls:
        headers, body = call["headers"], call["body"]
        given = headers["webhook-signature"].split(" ")
        assert len(given) == 2  # one per secret: receivers on either secret verify
        for secret in (KEY, SECRETS[1].encode()):
            assert (
                expected_signature(
                    secret, headers["webhook-id"], headers["webhook-timestamp"], body
                )
                in given
            )
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    attempts = setup[1].get(job_id).webhook_attempts
    assert [(a.attempt, a.status_code, a.delivered) for a in attempts] == [
        (1, 500, False), (2, 503, False), (3, 200, True),
    ]  # fmt: skip


def test_the_completed_payload(setup: Any, receiver: Receiver) -> None:
    spec = JobSpec(
        prompt="x", size="64x64", steps=2, seed=5, num_images=2, webhook=receiver.url,
        metadata={"user_id": "alice", "order": 17},
    )  # fmt: skip
    job_id = run_job(setup, spec)
    payload = json.loads(receiver.calls[0]["body"])
    assert payload["type"] == "job.completed" and payload["job_id"] == job_id
    assert payload["status"] == "succeeded" and payload["worker_id"] == "w1"
    assert [a["url"] for a in payload["assets"]] == [
        f"http://api/v1/assets/alice/{job_id}/0.png", f"http://api/v1/assets/alice/{job_id}/1.png",
    ]  # fmt: skip
    assert payload["assets"][1]["thumbnail_url"].endswith("/1.thumb.webp")
    assert payload["assets"][0]["metadata"]["seed"] == 5 and payload["assets"][0]["type"] == "image"
    meta = payload["metadata"]
    assert meta["seeds"] == [5, 6] and meta["batch_size"] == 2 and meta["processing_time"] > 0
    assert meta["caller"] == {"user_id": "alice", "order": 17} and "vram_used" in meta


def test_a_failed_job_sends_its_error(setup: Any, receiver: Receiver) -> None:
    settings, broker = setup
    sender = WebhookSender(settings, broker)
    worker = Worker(settings, broker, LocalStorage(settings.assets_dir, "http://api"),
                    FakeEngine(error=ValueError("kaput")), "w1", webhooks=sender)  # fmt: skip
    broker.enqueue(JobSpec(prompt="x", size="64x64", steps=2, webhook=receiver.url))
    worker.run_once()
    sender.close()
    payload = json.loads(receiver.calls[0]["body"])
    assert payload["type"] == "job.failed" and payload["status"] == "failed"
    assert payload["error"] == {"code": "internal_error", "message": "ValueError: kaput"}


def test_redirects_are_not_followed(setup: Any, receiver: Receiver) -> None:
    receiver.script = [(302, {"Location": receiver.url + "/elsewhere"})]
    job_id = run_job(
        setup, JobSpec(prompt="x", size="64x64", steps=2, webhook=receiver.url + "/hook")
    )
    assert [call["path"] for call in receiver.calls] == ["/hook"]
    (attempt,) = setup[1].get(job_id).webhook_attempts
    assert attempt.status_code == 302 and not attempt.retryable
    assert "redirects are not followed" in (attempt.error or "")


def test_a_client_error_is_not_retried(setup: Any, receiver: Receiver) -> None:
    receiver.script = [(404, {})]
    job_id = run_job(setup, JobSpec(prompt="x", size="64x64", steps=2, webhook=receiver.url))
    assert len(receiver.calls) == 1 and len(setup[1].get(job_id).webhook_attempts) == 1


def test_429_honours_retry_after(setup: Any, receiver: Receiver) -> None:
    receiver.script = [(429, {"Retry-After": "7"}), (200, {})]
    sleeps: list[float] = []
    run_job(setup, JobSpec(prompt="x", size="64x64", steps=2, webhook=receiver.url), sleeps=sleeps)
    assert len(receiver.calls) == 2 and sleeps == [7.0]


def test_gives_up_after_max_attempts(setup: Any, receiver: Receiver) -> None:
    receiver.script = [(500, {})] * 10
    job_id = run_job(setup, JobSpec(prompt="x", size="64x64", steps=2, webhook=receiver.url))
    assert len(receiver.calls) == 5 and len(setup[1].get(job_id).webhook_attempts) == 5


def test_private_targets_are_refused_without_a_connection(setup: Any, receiver: Receiver) -> None:
    settings, broker = setup
    strict = settings.model_copy(update={"fetch_allow": ""})
    sender = WebhookSender(strict, broker)
    job, _ = broker.enqueue(JobSpec(prompt="x", webhook=receiver.url))
    sender.notify(broker.cancel(job.id), EventType.CANCELED)
    sender.close()
    assert receiver.calls == []
    (attempt,) = broker.get(job.id).webhook_attempts
    assert attempt.error is not None and attempt.error.startswith("refused")


def test_progress_webhooks_only_when_asked(setup: Any, receiver: Receiver) -> None:
    run_job(
        setup,
        JobSpec(prompt="x", size="64x64", steps=4, webhook=receiver.url, webhook_progress=True),
    )
    kinds = [json.loads(call["body"])["type"] for call in receiver.calls]
    assert kinds == ["job.progress"] * 3 + ["job.completed"]  # steps 1-3 in order, then done
    receiver.calls.clear()
    run_job(setup, JobSpec(prompt="x", size="64x64", steps=4, webhook=receiver.url))
    assert [json.loads(call["body"])["type"] for call in receiver.calls] == ["job.completed"]


def test_default_webhook_from_settings(setup: Any, receiver: Receiver) -> None:
    settings, broker = setup
    setup = (settings.model_copy(update={"webhook_url": receiver.url}), broker)
    run_job(setup, JobSpec(prompt="x", size="64x64", steps=2))
    assert len(receiver.calls) == 1


def test_retry_delay_backs_off_with_jitter_and_respects_retry_after() -> None:
    for attempt, ceiling in ((1, 2.0), (2, 4.0), (3, 8.0)):
        delays = [retry_delay(attempt, None, 2.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(set(delays)) > 1
    assert retry_delay(1, "30", 2.0) == 30.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 18 <= retry_delay(1, later, 2.0) <= 21
    assert retry_delay(30, None, 2.0) <= 300


def test_api_refuses_private_webhook_and_signals_queued_cancels(
    tmp_path: Path, receiver: Receiver
) -> None:
    from fastapi.testclient import TestClient

    from sdworker.api.app import create_app

    settings = Settings(_env_file=None, data_dir=tmp_path, fetch_allow="127.0.0.1")
    with TestClient(create_app(settings)) as client:
        refused = client.post("/v1/jobs", json={"prompt": "x", "webhook": "http://10.0.0.7/hook"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == [
            "body",
            "webhook",
        ]
        job = client.post("/v1/jobs", json={"prompt": "x", "webhook": receiver.url}).json()
        assert client.delete(f"/v1/jobs/{job['id']}").json()["status"] == "canceled"
    payload = json.loads(receiver.calls[0]["body"])
    assert payload["type"] == "job.canceled" and payload["job_id"] == job["id"]
    assert JobStatus(payload["status"]) is JobStatus.CANCELED
