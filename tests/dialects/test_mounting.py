"""Where dialects are mounted (SDWORKER_DIALECTS): defaults without clashes, prefixes,
the root, off, refused clashes; open health checks; the replaced services' fields on
the native /health and /status. In-process (no worker)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from sdworker.api.app import create_app
from sdworker.errors import ConfigError
from sdworker.settings import DIALECT_DEFAULT_PREFIXES, Settings
from tests.api.conftest import client, make_client, make_settings

__all__ = ["client", "make_client", "make_settings"]  # the in-process API fixtures


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
