"""The HTTP API in-process (TestClient, no worker: accepted jobs stay queued).

Validation (422 naming the field), not-found, asset key safety, body limits, API keys,
cancel, pagination, docs, the sync endpoint's timeout and a schemathesis fuzz for 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.api.conftest import png_base64

TINY = {"prompt": "a fox", "size": "64x64", "steps": 2}


def field_of(response: Any) -> list[str]:
    """The field names in a 422's `detail` entries (FastAPI's shape: loc = [body, field])."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    return [str(entry["loc"][-1]) for entry in detail]


def submit(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/jobs", json={**TINY, **fields})
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"steps": 0}, "steps", []),
        ({"steps": 151}, "steps", []),
        ({"size": "500x512"}, "width", ["500", "multiple of 8"]),
        ({"size": "512x36"}, "height", ["36"]),
        ({"scheduler": "warp"}, "scheduler", ["warp", "euler"]),
        ({"num_images": 9}, "num_images", ["9", "8"]),
        ({"task": "img2img"}, "image", ["image"]),
        ({"task": "inpaint", "image": png_base64(64, 64)}, "mask", ["mask"]),
        ({"image": "not base64 at all!"}, "image", ["image"]),
        ({"image": base64.b64encode(b"just some text, no picture").decode()}, "image", []),
        ({"image": "data:image/png;base64,%%%"}, "image", []),
        ({"model": "no-such-model"}, "model", ["no-such-model"]),
        ({"priority": "whenever"}, "priority", []),
        ({"unknown_field": 1}, "unknown_field", []),
    ],
    ids=lambda value: json.dumps(value)[:40] if isinstance(value, dict) else None,
)
def test_invalid_specs_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str, words: list[str]
) -> None:
    response = client.post("/v1/jobs", json={**TINY, **body})
    assert field in field_of(response)
    message = json.dumps(response.json()["detail"])
    for word in words:
        assert word in message, message
    assert client.get("/v1/jobs").json()["jobs"] == []  # nothing was queued


def test_a_server_file_path_as_image_is_refused(client: TestClient, tmp_path: Path) -> None:
    picture = tmp_path / "on-the-server.png"
    picture.write_bytes(base64.b64decode(png_base64(64, 64)))
    for ref in (str(picture), "/etc/passwd", "./x.png", "file://" + str(picture)):
        response = client.post("/v1/jobs", json={**TINY, "image": ref, "strength": 0.5})
        assert field_of(response) == ["image"], ref
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_mask_of_another_size_than_the_inline_image_names_mask(client: TestClient) -> None:
    response = client.post(
        "/v1/jobs",
        json={**TINY, "image": png_base64(64, 64), "mask": png_base64(32, 32, "L")},
    )
    assert field_of(response) == ["mask"]
    assert "32x32" in response.json()["detail"][0]["msg"]


def test_inline_image_and_mask_of_the_same_size_are_accepted(client: TestClient) -> None:
    accepted = submit(
        client, image="data:image/png;base64," + png_base64(64, 64), mask=png_base64(64, 64, "L")
    )
    job = client.get(f"/v1/jobs/{accepted['id']}").json()
    assert job["status"] == "queued"
    assert job["spec"]["mask"]


def test_model_under_the_home_of_an_unknown_user_is_a_422_not_a_500(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={**TINY, "model": "~no-such-user-sdw/model"})
    assert field_of(response) == ["model"]


def test_model_paths_outside_the_model_root_reveal_nothing(
    client: TestClient, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.ckpt"
    secret.write_text("TOP-SECRET-CONTENT")
    existing = client.post("/v1/jobs", json={**TINY, "model": str(secret)})
    missing = client.post("/v1/jobs", json={**TINY, "model": str(tmp_path / "missing.ckpt")})
    assert existing.status_code == missing.status_code == 422
    # A caller must not be able to tell an existing server file from a missing one.
    assert existing.json()["error"]["code"] == missing.json()["error"]["code"]


# -- not found ---------------------------------------------------------------------------


def test_unknown_job_is_404_for_get_delete_and_events(client: TestClient) -> None:
    for method, path in (
        ("GET", "/v1/jobs/01NOSUCHJOB"),
        ("DELETE", "/v1/jobs/01NOSUCHJOB"),
        ("GET", "/v1/jobs/01NOSUCHJOB/events"),
    ):
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"


def test_unknown_asset_is_404(client: TestClient) -> None:
    response = client.get("/v1/assets/anonymous/01NOSUCHJOB/0.png")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


# -- asset keys --------------------------------------------------------------------------

SECRET = "TOP-SECRET-6f1c"


def asgi_get(app: FastAPI, raw_path: str) -> tuple[int, bytes]:
    """GET with the path exactly as given (httpx would normalise `..` away), decoded the
    way uvicorn decodes it: percent escapes undone once."""

    async def call() -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        status, body = 0, b""
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body += message.get("body", b"")

        await app(scope, receive, send)
        return status, body

    return asyncio.run(call())


TRAVERSALS = [
    "../secret.txt",
    "../../secret.txt",
    "anonymous/../../../secret.txt",
    "%2e%2e/%2e%2e/secret.txt",
    "%2E%2E%2F%2E%2E%2Fsecret.txt",
    "..%2f..%2fsecret.txt",
    "..%252f..%252fsecret.txt",
    "%252e%252e/%252e%252e/secret.txt",
    "..\\..\\secret.txt",
    "..%5c..%5csecret.txt",
    "anonymous/..%5c..%5c..%5csecret.txt",
    ".../secret.txt",
    "./../secret.txt",
    "{secret}",
    "/{secret}",
    "%2f{secret_q}",
    "//{secret}",
    "file:{secret}",
    "..%00/secret.txt",
    "anonymous/%00../../secret.txt",
    "%c0%ae%c0%ae/%c0%ae%c0%ae/secret.txt",
    "..;/..;/secret.txt",
    ".%2e/.%2e/secret.txt",
]


@pytest.mark.parametrize("template", TRAVERSALS)
def test_asset_path_traversal_never_succeeds_nor_leaks(
    make_client: Callable[..., TestClient], tmp_path: Path, template: str
) -> None:
    client = make_client()
    app = client.app
    assert isinstance(app, FastAPI)
    secret = tmp_path / "secret.txt"  # next to data_dir (tmp_path/data)
    secret.write_text(SECRET)
    (tmp_path / "data" / "secret.txt").write_text(SECRET)  # and next to assets/
    raw = template.format(secret=secret, secret_q=str(secret).replace("/", "%2f"))
    status, body = asgi_get(app, "/v1/assets/" + raw)
    assert status != 200, raw
    assert status < 500, (raw, status, body)
    assert SECRET.encode() not in body
    # The same through the test client (which normalises `..` segments itself).
    response = client.get("/v1/assets/" + raw)
    assert response.status_code != 200 or SECRET not in response.text
    assert SECRET not in response.text


def test_a_stored_asset_is_served_but_its_neighbours_are_not(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    services.storage.put("anonymous/job1/0.png", b"\x89PNG-fake", "image/png")
    ok = client.get("/v1/assets/anonymous/job1/0.png")
    assert ok.status_code == 200
    assert ok.headers["content-type"] == "image/png"
    assert ok.content == b"\x89PNG-fake"
    assert client.get("/v1/assets/anonymous/job1").status_code == 404  # a folder
    assert client.get("/v1/assets/anonymous/job1/.tmp-x").status_code in (400, 404)


# -- body limit --------------------------------------------------------------------------


def test_body_over_the_limit_with_content_length_is_413(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=4096)
    response = client.post("/v1/jobs", json={**TINY, "prompt": "x" * 5000})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert client.post("/v1/jobs", json=TINY).status_code == 202  # under: fine


def test_streamed_body_over_the_limit_without_content_length_is_413(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=4096)

    def chunks() -> Any:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413, response.text
    assert client.get("/v1/jobs").json()["jobs"] == []


def test_streamed_body_under_the_limit_is_accepted(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=4096)

    def chunks() -> Any:
        yield json.dumps(TINY).encode()

    response = client.post(
        "/v1/jobs", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 202, response.text


# -- API keys ----------------------------------------------------------------------------

PROTECTED = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/01NOSUCHJOB"),
    ("DELETE", "/v1/jobs/01NOSUCHJOB"),
    ("GET", "/v1/jobs/01NOSUCHJOB/events"),
    ("POST", "/v1/generate"),
    ("GET", "/v1/assets/anonymous/x/0.png"),
    ("GET", "/status"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/health/"),
    ("GET", "/nowhere"),
]


def test_api_keys_guard_every_route_but_health(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="k1,k2")
    wrong_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer k1k2"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic k1"},
        {"Authorization": "k1"},
        {"X-API-Key": "k1"},
    ]
    for method, path in PROTECTED:
        for headers in wrong_headers:
            response = client.request(method, path, headers=headers, json=TINY)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"].lower().startswith("bearer")
            assert response.json()["error"]["code"] == "unauthorized"

    health = client.get("/health")
    assert health.status_code != 401
    assert health.json()["status"] in {"starting", "unhealthy"}  # no worker here

    good = {"Authorization": "Bearer k2"}
    accepted = client.post("/v1/jobs", json=TINY, headers=good)
    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    for path in ("/v1/jobs", f"/v1/jobs/{job_id}", "/status", "/metrics", "/openapi.json"):
        assert client.get(path, headers=good).status_code == 200, path
    assert client.get(path, headers={"Authorization": "bearer k1"}).status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}", headers=good).json()["status"] == "canceled"


def test_no_api_keys_means_no_authentication(client: TestClient) -> None:
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/status").status_code == 200


# -- jobs --------------------------------------------------------------------------------


def test_delete_of_a_queued_job_cancels_it_and_it_never_starts(client: TestClient) -> None:
    job_id = submit(client)["id"]
    canceled = client.delete(f"/v1/jobs/{job_id}")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "canceled"
    assert job["started_at"] is None
    assert job["attempts"] == 0
    assert job["queue_position"] is None
    assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "canceled"  # idempotent
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events == ["event: queued", "event: canceled"]


def test_list_pagination_returns_every_job_once_newest_first(client: TestClient) -> None:
    ids = [submit(client, seed=i)["id"] for i in range(7)]
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["jobs"]) <= 3
        seen.extend(job["id"] for job in body["jobs"])
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert pages == 3
    assert seen == list(reversed(ids))
    assert (
        client.get("/v1/jobs", params={"status": "queued", "limit": 200}).json()["next_cursor"]
        is None
    )
    assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["jobs"] == []
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/v1/jobs", params={"cursor": "abc"}).status_code == 422


def test_get_job_shows_queue_position_by_priority_then_age(client: TestClient) -> None:
    first = submit(client)["id"]
    second = submit(client)["id"]
    urgent = submit(client, priority="urgent")
    low = submit(client, priority="low")["id"]
    assert urgent["queue_position"] == 1

    def position(job_id: str) -> int:
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "queued"
        return int(job["queue_position"])

    assert [position(j) for j in (urgent["id"], first, second, low)] == [1, 2, 3, 4]
    client.delete(f"/v1/jobs/{first}")
    assert [position(j) for j in (urgent["id"], second, low)] == [1, 2, 3]


def test_idempotency_key_same_body_same_job_other_body_409(client: TestClient) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = client.post("/v1/jobs", json=TINY, headers=headers)
    again = client.post("/v1/jobs", json=TINY, headers=headers)
    assert first.status_code == again.status_code == 202
    assert first.json()["created"] is True
    assert again.json()["created"] is False
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**TINY, "prompt": "other"}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict"
    assert len(client.get("/v1/jobs").json()["jobs"]) == 1


def test_openapi_and_docs_are_served(client: TestClient) -> None:
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events", "/v1/generate"):
        assert path in paths
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()


def test_generate_without_a_worker_answers_202_with_location_after_the_timeout(
    client: TestClient,
) -> None:
    response = client.post("/v1/generate", json=TINY)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued"
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    assert client.get(response.headers["location"]).json()["id"] == job["id"]


def test_generate_validates_like_submit(client: TestClient) -> None:
    assert field_of(client.post("/v1/generate", json={**TINY, "size": "500x512"})) == ["width"]


def test_health_without_a_worker_is_503(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["model_loaded"] is False


def test_status_and_metrics(client: TestClient) -> None:
    submit(client, priority="high")
    status = client.get("/status").json()
    assert status["queue"]["high"] == 1
    assert status["quality_presets"] == {"sdxl_image_fast": 15, "sdxl_image_high": 25}
    assert "euler" in status["schedulers"]
    text = client.get("/metrics").text
    assert 'sdworker_queue_depth{priority="high"} 1.0' in text
    assert "sdworker_http_requests_total" in text


# -- schemathesis ------------------------------------------------------------------------


def test_schema_valid_requests_never_get_a_5xx(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, given
    from schemathesis.checks import not_a_server_error

    from sdworker.api.app import create_app

    app = create_app(make_settings(sync_timeout_s=0.05))
    # Left out: the SSE streams (a queued job's stream never ends without a worker: the
    # native events and the candle dialect's) and the health checks, whose 503 without a
    # worker is their documented answer.
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(
        path_regex=r"(/events|/health|^/candle/.*)$"
    )
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 40  # the native API and the dialects
    try:
        for operation in operations:
            native = operation.path.startswith(("/v1/jobs", "/v1/assets", "/v1/generate"))

            @given(case=operation.as_strategy())
            @hypothesis.settings(
                max_examples=30 if native else 12,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def fuzz(case: schemathesis.Case) -> None:
                response = case.call()
                # A synchronous route that waited out its timeout (no worker here) says
                # so with a 504 naming the job: the documented answer, not a crash.
                if response.status_code == 504:
                    return
                case.validate_response(response, checks=[not_a_server_error])

            try:
                fuzz()
            except Exception as exc:  # collect every operation's failure, then report
                failures.append(f"{operation.label}: {exc}"[:2000])
    finally:
        app.state.services.broker.close()
    assert not failures, "\n\n".join(failures)
