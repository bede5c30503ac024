"""Regressions found in review: leaks, 500s, SSRF gaps, webhooks nobody sent."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber
from fastapi.testclient import TestClient

from sdworker.api.app import create_app
from sdworker.broker.base import WorkerInfo
from sdworker.broker.sqlite import SqliteBroker
from sdworker.jobs import JobSpec, JobStatus
from sdworker.netguard import AddressPolicy, UnsafeUrlError
from sdworker.settings import Settings
from sdworker.storage.base import AssetNotFoundError
from sdworker.storage.local import LocalStorage
from sdworker.storage.s3 import S3Storage
from sdworker.webhooks import WebhookSender
from sdworker.worker import Worker
from tests.service.test_worker import FakeEngine
from tests.support.receiver import Receiver


def test_connections_of_finished_threads_are_closed(tmp_path: Path) -> None:
    broker = SqliteBroker(tmp_path / "jobs.db")
    for _ in range(30):
        thread = threading.Thread(target=broker.stats)
        thread.start()
        thread.join()
    broker.stats()  # a connection opened after them sweeps the dead ones
    assert len(broker._connections) <= 2
    broker.close()


@pytest.fixture
def client(tmp_path: Path) -> Any:
    (tmp_path / "models").mkdir()
    settings = Settings(_env_file=None, data_dir=tmp_path, model_root=tmp_path / "models")
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "a" * 250}, "model"),
        ({"webhook": "http://[::1"}, "webhook"),
        ({"image": "http://[foo/a.png"}, "image"),
        ({"model": "stabilityai/stable-diffusion-xl-base-1.0"}, "model"),
    ],
)
def test_odd_but_schema_valid_requests_are_422_not_500(
    client: Any, body: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json={"prompt": "x", **body})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", field]


def test_hub_models_need_the_operators_permission(client: Any) -> None:
    refused = client.post("/v1/jobs", json={"prompt": "x", "model": "acme/some-sdxl"})
    assert "SDWORKER_ALLOWED_MODELS" in refused.json()["error"]["message"]


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("64:ff9b::a00:5", False),  # NAT64 of 10.0.0.5
        ("64:ff9b::a9fe:a9fe", False),  # NAT64 of 169.254.169.254
        ("64:ff9b:1::7f00:1", False),  # local-use NAT64 of 127.0.0.1
        ("::127.0.0.1", False),  # IPv4-compatible loopback
        ("2002:a00:1::1", False),  # 6to4 of 10.0.0.1
        ("64:ff9b::808:808", True),  # NAT64 of a public address
        ("2606:4700:4700::1111", True),
    ],
)
def test_ipv6_forms_that_carry_an_ipv4_address_are_judged_by_it(address: str, public: bool) -> None:
    policy = AddressPolicy()
    if public:
        policy.check_address(ipaddress.ip_address(address))
    else:
        with pytest.raises(UnsafeUrlError):
            policy.check_address(ipaddress.ip_address(address))


def test_s3_access_denied_for_a_missing_key_is_a_404() -> None:
    storage = S3Storage("bucket", region="us-east-1", access_key_id="k", secret_access_key="s")
    with Stubber(storage._client) as stub:
        stub.add_client_error("get_object", service_error_code="AccessDenied", http_status_code=403)
        with pytest.raises(AssetNotFoundError):
            storage.get("o/j/0.png")


def test_a_job_failed_by_reclaim_still_gets_its_webhook(tmp_path: Path) -> None:
    receiver = Receiver()
    try:
        settings = Settings(
            _env_file=None, data_dir=tmp_path, fetch_allow="127.0.0.1", max_attempts=1,
            heartbeat_interval_s=0.05, heartbeat_timeout_s=0.2, poll_interval_s=0.02,
        )  # fmt: skip
        broker = SqliteBroker(settings.database_path, max_attempts=1)
        job, _ = broker.enqueue(JobSpec(prompt="x", webhook=receiver.url))
        broker.claim("dead-worker")
        broker.heartbeat(WorkerInfo(id="dead-worker", current_job=job.id))
        time.sleep(0.3)
        sender = WebhookSender(settings, broker)
        worker = Worker(settings, broker, LocalStorage(tmp_path, "http://api"), FakeEngine(), "w2",
                        webhooks=sender)  # fmt: skip
        thread = threading.Thread(target=worker.run_forever)
        thread.start()
        deadline = time.monotonic() + 10
        while broker.get(job.id).status is JobStatus.RUNNING and time.monotonic() < deadline:
            time.sleep(0.02)
        worker.stop()
        thread.join(timeout=10)
        sender.close()
        assert broker.get(job.id).status is JobStatus.FAILED
        payload = json.loads(receiver.calls[0]["body"])
        assert payload["type"] == "job.failed" and payload["error"]["code"] == "worker_lost"
        broker.close()
    finally:
        receiver.close()
