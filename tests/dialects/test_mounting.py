"""Where dialects are mounted (SDWORKER_DIALECTS): defaults without clashes, prefixes,
the root, off, refused clashes; open health checks; the replaced services' fields on
the native /health and /status. In-process (no worker)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from sdworker.api.app import create_app
from sdworker.errors import ConfigError
from sdworker.jobs import JobSpec
from sdworker.settings import DIALECT_DEFAULT_PREFIXES, Settings
from tests.support.receiver import Receiver


def paths_of(client: TestClient) -> set[str]:
    return set(client.get("/openapi.json").json()["paths"])


def test_every_dialect_is_reachable_by_default(client: TestClient) -> None:
    paths = paths_of(client)
    for path in (
        "/sdapi/v1/txt2img",
        "/v1/images/generations",
        "/runpod/runsync",
        "/edge/jobs",
        "/lcm/generate",
        "/dream/generate",
        "/candle/execute",
        "/v1/jobs",
        "/health",
        "/status",
    ):
        assert path in paths, path
    assert "/generate" not in paths  # both lcm and dream want it: neither takes the root


def test_a_dialect_moves_to_the_root_or_another_prefix_or_off(
    make_client: Callable[..., TestClient],
) -> None:
    paths = paths_of(make_client(dialects={"lcm": "/", "dream": "/dream-ai/v2", "runpod": "off"}))
    assert {"/generate", "/superres", "/dream-ai/v2/generate"} <= paths
    assert "/lcm/generate" not in paths
    assert not any(path.startswith("/runpod") for path in paths)


def test_two_dialects_on_one_route_are_refused_naming_both(make_settings: Any) -> None:
    settings = make_settings(dialects={"lcm": "/", "dream": "/"})
    with pytest.raises(ConfigError) as caught:
        create_app(settings)
    message = caught.value.message
    assert "dialect dream" in message and "dialect lcm" in message
    assert "POST /generate" in message and "SDWORKER_DIALECTS" in message


def test_a_dialect_clashing_with_the_native_api_is_refused(make_settings: Any) -> None:
    # RunPod's /status/{id} at the root would shadow nothing native, but Dream's
    # /status/{job_id} and RunPod's /status/{id} are one route.
    settings = make_settings(dialects={"runpod": "/", "dream": "/"})
    with pytest.raises(ConfigError, match=r"/status/\{"):
        create_app(settings)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"nosuch": "/x"}, ["nosuch", "a1111"]),
        ({"lcm": "no-slash"}, ["dialects.lcm", "off"]),
        ({"lcm": "/bad prefix"}, ["dialects.lcm"]),
    ],
)
def test_bad_dialect_settings_name_the_dialect(value: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(_env_file=None, dialects=value)
    for word in words:
        assert word in str(caught.value)


def test_dialects_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDWORKER_DIALECTS", '{"lcm": "/", "candle": "off", "dream": "/d/"}')
    prefixes = Settings(_env_file=None).dialect_prefixes
    assert prefixes["lcm"] == "" and prefixes["dream"] == "/d"
    assert "candle" not in prefixes
    assert set(prefixes) == set(DIALECT_DEFAULT_PREFIXES) - {"candle"}


def test_health_checks_stay_open_with_api_keys(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="k1")
    for path in ("/health", "/dream/health", "/candle/health", "/runpod/health", "/lcm/health"):
        assert client.get(path).status_code != 401, path
    assert client.post("/lcm/generate", json={"prompt": "x"}).status_code == 401
    basic = client.post("/v1/jobs", json={"prompt": "x", "size": "64x64"}, auth=("anyone", "k1"))
    assert basic.status_code == 202, basic.text  # HTTP Basic with the key as password


def test_native_health_and_status_carry_the_replaced_services_fields(client: TestClient) -> None:
    health = client.get("/health").json()
    for field in ("model_version", "pipeline_loaded", "refiner_loaded", "gpu_available"):
        assert field in health
    assert health["gpu_count"] == 0 and health["gpu_available"] is False  # no worker here
    status = client.get("/status").json()
    assert status["batch_support"] is True
    assert status["quality_tiers"] == ["sdxl_image_fast", "sdxl_image_high"]
    assert status["i2i_pipeline"] is True
    assert status["thumbnail_generation"] is True


def test_edge_callbacks_default_to_the_supabase_job_callback() -> None:
    assert Settings(_env_file=None).edge_callback_target is None
    supabase = Settings(_env_file=None, supabase_url="https://abc.supabase.co/")
    assert supabase.edge_callback_target == "https://abc.supabase.co/functions/v1/job-callback"
    explicit = Settings(
        _env_file=None, supabase_url="https://abc.supabase.co", edge_callback_url="https://x/cb"
    )
    assert explicit.edge_callback_target == "https://x/cb"


def test_only_the_edge_dialect_sets_the_edge_callback_format(
    make_client: Callable[..., TestClient],
) -> None:
    """Edge callbacks carry the edge system's service key and complete its jobs: a
    native caller may not ask for them, and they only ever go to the operator's URL."""
    client = make_client(edge_callback_url="https://edge.example/job-callback")
    body = {"prompt": "x", "size": "64x64", "webhook_format": "edge"}
    refused = client.post("/v1/jobs", json=body | {"webhook": "https://evil.example/h"})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "webhook_format"]
    assert client.get("/v1/jobs").json()["jobs"] == []
    services = client.app.state.services  # type: ignore[attr-defined]
    job, _ = services.broker.enqueue(
        JobSpec(prompt="x", webhook="https://evil.example/h", webhook_format="edge")
    )
    assert services.webhooks.target_of(job) == "https://edge.example/job-callback"


def test_canceling_a_queued_dialect_job_sends_its_webhook(
    make_client: Callable[..., TestClient],
) -> None:
    receiver = Receiver()
    try:
        client = make_client(fetch_allow="127.0.0.1")  # no worker: the job stays queued
        run = client.post(
            "/runpod/run", json={"input": {"prompt": "x"}, "webhook": f"{receiver.url}/hook"}
        )
        assert run.status_code == 200, run.text
        job_id = run.json()["id"]
        canceled = client.post(f"/runpod/cancel/{job_id}").json()
        assert canceled == {"id": job_id, "status": "CANCELLED"}
        deadline = time.monotonic() + 10
        while not receiver.calls:
            assert time.monotonic() < deadline, "no webhook for the canceled job"
            time.sleep(0.02)
        body = json.loads(receiver.calls[0]["body"])
        assert body["type"] == "job.canceled" and body["job_id"] == job_id
    finally:
        receiver.close()
