"""The whole service as a user runs it: a real `sdworker serve` subprocess (API + SQLite
queue + supervised worker process) on the tiny model, driven over HTTP with httpx.

One module-scoped server serves the simple cases; the kill, crash-restart and Ctrl-C
tests start servers of their own. Every server (and its worker, which runs in a session
of its own) is killed at teardown, whatever happened.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sdworker.broker.sqlite import SqliteBroker

TINY = {"prompt": "a lighthouse", "size": "64x64", "steps": 2}
# Long enough (about 0.5 s a step on a CPU) that it is still running whenever a test
# needs a busy worker; every test cancels it when done.
LONG = {"prompt": "long", "size": "512x512", "steps": 150}
STARTUP_TIMEOUT_S = 120.0


# -- the server process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _is_sdworker_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"sdworker" in cmdline and b"worker" in cmdline


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state != "Z"


class Server:
    """One `sdworker serve` on a data dir; remembers every worker pid it has seen."""

    def __init__(self, data_dir: Path, cache_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.cache_dir = cache_dir
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.worker_pids: set[int] = set()
        self.client = httpx.Client(base_url=self.url, timeout=60.0)

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("SDWORKER_") and key not in {"PYTEST_CURRENT_TEST"}
        }
        env.update(
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            SDWORKER_DATA_DIR=str(self.data_dir),
            SDWORKER_CACHE_DIR=str(self.cache_dir),
            SDWORKER_MODEL="tiny-sdxl",
            SDWORKER_DEVICE="cpu",  # step times the tests rely on stay predictable
            SDWORKER_HEARTBEAT_INTERVAL_S="0.5",
            SDWORKER_HEARTBEAT_TIMEOUT_S="3",
            SDWORKER_PROGRESS_INTERVAL_S="0",
            SDWORKER_DRAIN_TIMEOUT_S="30",
            SDWORKER_POLL_INTERVAL_S="0.05",
        )
        return env

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdworker", "serve", "--port", str(self.port)],
            env=self.env(),
            cwd=self.data_dir.parent,  # no stray .env of the developer's
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> dict[str, Any]:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
            self.remember_workers()
            try:
                response = self.client.get("/health", timeout=5)
                last = f"{response.status_code} {response.text}"
                if response.status_code == 200:
                    health: dict[str, Any] = response.json()
                    self.remember_workers()
                    return health
                assert response.status_code == 503, last
                assert response.json()["status"] in {"starting", "unhealthy"}, last
            except httpx.TransportError as exc:
                last = repr(exc)
            time.sleep(0.2)
        pytest.fail(f"serve not healthy after {timeout}s ({last}):\n{self.log_tail()}")

    def worker_pid(self) -> int:
        """The pid of the worker /health reports, as /status lists it."""
        worker_id = self.client.get("/health").json()["worker_id"]
        workers = self.client.get("/status").json()["workers"]
        pids = [w["pid"] for w in workers if w["id"] == worker_id]
        assert len(pids) == 1, (worker_id, workers)
        self.worker_pids.add(pids[0])
        return int(pids[0])

    def remember_workers(self) -> None:
        """Children of serve (the worker is one, in a session of its own)."""
        if self.process is None or self.process.poll() is not None:
            return
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _ppid(int(entry.name)) == self.process.pid:
                self.worker_pids.add(int(entry.name))

    def kill_workers(self) -> None:
        for pid in self.worker_pids:
            if _alive(pid) and _is_sdworker_worker(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def crash(self) -> None:
        """SIGKILL serve and its worker: nothing gets to clean up."""
        assert self.process is not None
        self.remember_workers()
        self.process.kill()
        self.process.wait(timeout=30)
        self.kill_workers()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in self.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        """Stop serve (gently, then not), then any worker it left behind."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.remember_workers()
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
        finally:
            self.kill_workers()
            self.client.close()


@contextlib.contextmanager
def server_pool(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> Iterator[Callable[..., Server]]:
    """Starts servers (on a fresh or a given data dir) and always stops them on exit."""
    servers: list[Server] = []

    def start(data_dir: Path | None = None) -> Server:
        root = tmp_path_factory.mktemp("serve")
        server = Server(data_dir or root / "data", cache_dir, root / "serve.log")
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()


@pytest.fixture
def server_factory(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_folder: Path
) -> Iterator[Callable[..., Server]]:
    """Servers of one test (kill and restart tests), stopped when the test ends."""
    with server_pool(tmp_path_factory, cache_dir) as start:
        yield start


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_folder: Path
) -> Iterator[Server]:
    """The server the simple cases share."""
    with server_pool(tmp_path_factory, cache_dir) as start:
        shared = start()
        shared.wait_healthy()
        yield shared


# -- SSE and waiting ---------------------------------------------------------------------


@dataclass
class Event:
    id: int
    type: str
    data: dict[str, Any]


def stream_events(
    client: httpx.Client,
    job_id: str,
    *,
    last_event_id: int | None = None,
    on_event: Callable[[Event], None] | None = None,
    timeout: float = 120.0,
) -> list[Event]:
    """Every event of a job's SSE stream until the server ends it (a tiny SSE parser)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    with client.stream(
        "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            assert time.monotonic() < deadline, f"stream still open after {timeout}s"
            if line.startswith(":"):  # comment (keep-alive ping)
                continue
            if line == "":
                if "data" in fields or "event" in fields:
                    event = Event(
                        int(fields["id"]),
                        fields.get("event", "message"),
                        json.loads(fields["data"]),
                    )
                    events.append(event)
                    if on_event is not None:
                        on_event(event)
                fields = {}
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data" and "data" in fields:
                value = fields["data"] + "\n" + value
            fields[name] = value
    return events


def wait_for(
    check: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.05
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    accepted: dict[str, Any] = response.json()
    return accepted


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        job = get_job(client, job_id)
        return job if job["status"] in {"succeeded", "failed", "canceled"} else None

    job: dict[str, Any] = wait_for(finished, f"job {job_id} to finish", timeout)
    return job


def wait_running(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        job = get_job(client, job_id)
        assert job["status"] in {"queued", "running"}, job
        return job if job["status"] == "running" and job["progress"]["step"] >= 1 else None

    job: dict[str, Any] = wait_for(running, f"job {job_id} to make progress", timeout)
    return job


@contextlib.contextmanager
def busy_worker(client: httpx.Client) -> Iterator[str]:
    """The worker busy on a long job for the duration; canceled afterwards."""
    job_id = submit(client, LONG)["id"]
    try:
        wait_running(client, job_id)
        yield job_id
    finally:
        client.delete(f"/v1/jobs/{job_id}")
        wait_terminal(client, job_id)


def asset_files(data_dir: Path, job_id: str) -> list[str]:
    folder = data_dir / "assets" / "anonymous" / job_id
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def assert_ordered(events: list[Event]) -> None:
    ids = [event.id for event in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), ids


# -- the simple cases, on one server -----------------------------------------------------


def test_sse_stream_then_assets(server: Server) -> None:
    client = server.client
    accepted = submit(client, {"prompt": "a red barn", "size": "320x256", "steps": 3, "seed": 7})
    assert accepted["created"] is True
    assert accepted["urls"]["events"].endswith(f"/v1/jobs/{accepted['id']}/events")

    events = stream_events(client, accepted["id"])  # returns only once the stream ended

    types = [event.type for event in events]
    assert types == ["queued", "started", "progress", "progress", "progress", "completed"]
    assert_ordered(events)
    progress = [event.data for event in events if event.type == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3]
    assert {p["total_steps"] for p in progress} == {3}
    assert [p["percent"] for p in progress] == [33.3, 66.7, 100.0]
    completed = events[-1].data
    assert completed["seeds"] == [7]
    (asset,) = completed["assets"]
    assert asset["content_type"] == "image/png"
    assert asset["metadata"]["steps"] == 3

    png = client.get(asset["url"])
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as image:
        assert image.format == "PNG"
        assert image.size == (320, 256)
        parameters = image.info["parameters"]
    assert parameters.startswith("a red barn\n")
    assert "Steps: 3" in parameters and "Seed: 7" in parameters and "Size: 320x256" in parameters

    thumb = client.get(asset["thumbnail_url"])
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert image.format == "WEBP"
        assert max(image.size) <= 256
        assert image.size[0] == 256  # the longest edge, scaled down, aspect kept
        assert abs(image.size[1] - 205) <= 1

    job = get_job(client, accepted["id"])
    assert job["status"] == "succeeded"
    assert job["attempts"] == 1
    assert job["progress"] == {"step": 3, "total_steps": 3, "percent": 100.0}
    assert asset_files(server.data_dir, accepted["id"]) == ["0.png", "0.thumb.webp"]

    # Resume after any event: exactly the later ones, none lost, none repeated.
    for index in (0, 1, 3, len(events) - 2):
        resumed = stream_events(client, accepted["id"], last_event_id=events[index].id)
        assert resumed == events[index + 1 :], index
    # After the terminal event: nothing, and the stream still ends.
    assert stream_events(client, accepted["id"], last_event_id=events[-1].id) == []
    assert stream_events(client, accepted["id"], last_event_id=0) == events


def test_cancel_a_queued_job_then_the_running_one(server: Server) -> None:
    client = server.client
    long_id = submit(client, LONG)["id"]
    try:
        wait_running(client, long_id)
        queued = submit(client, TINY)
        assert queued["status"] == "queued"
        assert queued["queue_position"] == 1
        canceled = client.delete(f"/v1/jobs/{queued['id']}")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "canceled"
        events = stream_events(client, queued["id"])
        assert [event.type for event in events] == ["queued", "canceled"]
        assert events[-1].data == {"while": "queued"}

        # Mid-run: the stream ends with `canceled` once the worker stopped.
        seen: list[Event] = []

        def cancel_on_progress(event: Event) -> None:
            if event.type == "progress" and not any(e.type == "progress" for e in seen):
                assert client.delete(f"/v1/jobs/{long_id}").status_code == 200
            seen.append(event)

        long_events = stream_events(client, long_id, on_event=cancel_on_progress)
    finally:
        client.delete(f"/v1/jobs/{long_id}")
        wait_terminal(client, long_id)
    assert long_events[-1].type == "canceled"
    assert long_events[-1].data == {"while": "running"}
    assert "completed" not in [event.type for event in long_events]
    assert_ordered(long_events)
    job = get_job(client, long_id)
    assert job["status"] == "canceled"
    assert 1 <= job["progress"]["step"] < job["progress"]["total_steps"] == 150
    assert asset_files(server.data_dir, long_id) == []

    never_ran = get_job(client, queued["id"])
    assert never_ran["status"] == "canceled"
    assert never_ran["started_at"] is None
    assert never_ran["attempts"] == 0
    assert never_ran["worker_id"] is None
    assert asset_files(server.data_dir, queued["id"]) == []


def test_idempotency_key(server: Server) -> None:
    client = server.client
    key = f"idem-{time.time_ns()}"
    first = submit(client, TINY, **{"Idempotency-Key": key})
    again = submit(client, TINY, **{"Idempotency-Key": key})
    assert first["created"] is True
    assert again["created"] is False
    assert again["id"] == first["id"]
    conflict = client.post(
        "/v1/jobs", json={**TINY, "prompt": "something else"}, headers={"Idempotency-Key": key}
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "conflict"
    assert wait_terminal(client, first["id"])["status"] == "succeeded"
    # Still the same job once it has run.
    assert submit(client, TINY, **{"Idempotency-Key": key})["id"] == first["id"]


def test_priorities_decide_the_start_order(server: Server) -> None:
    client = server.client
    with busy_worker(client):
        ids = {
            priority: submit(client, {**TINY, "priority": priority})["id"]
            for priority in ("low", "normal", "urgent", "high")
        }
        positions = {p: get_job(client, job_id)["queue_position"] for p, job_id in ids.items()}
        assert positions == {"urgent": 1, "high": 2, "normal": 3, "low": 4}
    jobs = {priority: wait_terminal(client, job_id) for priority, job_id in ids.items()}
    assert {job["status"] for job in jobs.values()} == {"succeeded"}
    by_start = sorted(jobs, key=lambda priority: jobs[priority]["started_at"])
    assert by_start == ["urgent", "high", "normal", "low"]


def test_generate_returns_png_bytes_with_accept_image(server: Server) -> None:
    response = server.client.post(
        "/v1/generate", json={**TINY, "seed": 1234}, headers={"Accept": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-seed"] == "1234"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (64, 64)
        assert "Seed: 1234" in image.info["parameters"]
    job = get_job(server.client, response.headers["x-job-id"])
    assert job["status"] == "succeeded"


def test_generate_returns_the_succeeded_job_as_json(server: Server) -> None:
    response = server.client.post("/v1/generate", json={**TINY, "num_images": 2, "seed": 5})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert job["result"]["seeds"] == [5, 6]
    assert [asset["metadata"]["asset_index"] for asset in job["result"]["assets"]] == [0, 1]
    assert asset_files(server.data_dir, job["id"]) == [
        "0.png",
        "0.thumb.webp",
        "1.png",
        "1.thumb.webp",
    ]


def test_generate_client_that_disconnects_cancels_its_job(server: Server) -> None:
    tag = f"disconnect-{time.time_ns()}"
    with pytest.raises(httpx.ReadTimeout):
        server.client.post("/v1/generate", json={**LONG, "metadata": {"tag": tag}}, timeout=1.5)
    jobs = server.client.get("/v1/jobs", params={"limit": 20}).json()["jobs"]
    (job_id,) = [job["id"] for job in jobs if job["metadata"].get("tag") == tag]
    job = wait_terminal(server.client, job_id, timeout=30)
    assert job["status"] == "canceled"
    assert job["progress"]["step"] < 150


def test_delete_of_a_finished_job_is_409(server: Server) -> None:
    job = server.client.post("/v1/generate", json=TINY).json()
    assert job["status"] == "succeeded"
    response = server.client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 409
    assert get_job(server.client, job["id"])["status"] == "succeeded"


def test_preset_fast_runs_15_steps(server: Server) -> None:
    response = server.client.post(
        "/v1/generate", json={"prompt": "x", "size": "64x64", "preset": "sdxl_image_fast"}
    )
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded"
    assert job["result"]["assets"][0]["metadata"]["steps"] == 15
    assert job["progress"]["total_steps"] == 15


def test_metrics(server: Server) -> None:
    assert server.client.post("/v1/generate", json=TINY).json()["status"] == "succeeded"
    response = server.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "sdworker_http_requests_total",
        "sdworker_queue_depth",
        "sdworker_job_duration_seconds_count",
    ):
        assert name in text, name
    assert 'sdworker_http_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    count = next(
        line for line in text.splitlines() if line.startswith("sdworker_job_duration_seconds_count")
    )
    assert float(count.split()[-1]) >= 1


def test_status_and_health(server: Server) -> None:
    health = server.client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    assert health.json()["model_loaded"] is True
    status = server.client.get("/status").json()
    assert status["model"] == "tiny-sdxl"
    assert status["family"] == "sdxl"
    assert {"euler", "euler_a", "dpmpp_2m", "ddim"} <= set(status["schedulers"])
    assert status["quality_presets"] == {"sdxl_image_fast": 15, "sdxl_image_high": 25}
    (worker,) = [w for w in status["workers"] if w["id"] == health.json()["worker_id"]]
    assert worker["model_loaded"] is True
    # the CPU defaults: the plain eager path
    assert worker["fast_path"]["compile"] == "off"
    assert worker["fast_path"]["channels_last"] is False
    assert status["cross_job_batching"] == {"max_jobs": 1, "max_images": 8, "window_s": 0.02}
    assert worker["pid"] == server.worker_pid()
    assert worker["pid"] in server.worker_pids
    assert worker["pid"] != server.process.pid  # type: ignore[union-attr]


def test_asset_traversal_over_real_http(server: Server) -> None:
    secret = server.data_dir.parent / "secret.txt"
    secret.write_text("E2E-SECRET-1b2c")
    (server.data_dir / "secret.txt").write_text("E2E-SECRET-1b2c")
    for raw in (
        "/v1/assets/../secret.txt",
        "/v1/assets/../../secret.txt",
        "/v1/assets/%2e%2e/%2e%2e/secret.txt",
        "/v1/assets/..%2f..%2fsecret.txt",
        "/v1/assets/..%5c..%5csecret.txt",
        f"/v1/assets/{secret}",
        f"/v1/assets//{secret}",
        "/v1/assets/anonymous/%2e%2e/%2e%2e/%2e%2e/secret.txt",
    ):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        try:
            connection.request("GET", raw)  # sent exactly as written
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert response.status != 200, raw
        assert response.status < 500, raw
        assert b"E2E-SECRET" not in body, raw


# -- a killed worker ---------------------------------------------------------------------


def test_killed_worker_is_restarted_and_its_job_completes_once(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory()
    server.wait_healthy()
    client = server.client
    first_pid = server.worker_pid()
    job_id = submit(client, {"prompt": "kill me", "size": "256x256", "steps": 40, "seed": 3})["id"]
    killed: list[int] = []

    def kill_on_first_progress(event: Event) -> None:
        if event.type == "progress" and not killed:
            os.kill(first_pid, signal.SIGKILL)
            killed.append(event.id)

    events = stream_events(client, job_id, on_event=kill_on_first_progress, timeout=150)

    assert killed, "no progress event arrived"
    server.remember_workers()
    types = [event.type for event in events]
    assert types.count("completed") == 1, types
    assert types[-1] == "completed"
    assert "failed" not in types and "canceled" not in types
    assert types.count("started") == 2, types
    requeued = [e for e in events if e.type == "queued" and e.data.get("reason") == "worker_lost"]
    assert len(requeued) == 1, events
    assert_ordered(events)
    starts = [event.data for event in events if event.type == "started"]
    assert [start["attempt"] for start in starts] == [1, 2]
    assert starts[0]["worker_id"] != starts[1]["worker_id"]
    last_progress = [event.data for event in events if event.type == "progress"][-1]
    assert last_progress == {"step": 40, "total_steps": 40, "percent": 100.0}

    job = get_job(client, job_id)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2
    assert job["worker_id"] == starts[1]["worker_id"]
    assert len(job["result"]["assets"]) == 1
    assert asset_files(server.data_dir, job_id) == ["0.png", "0.thumb.webp"]
    assert not _alive(first_pid)

    health = server.wait_healthy(timeout=30)
    assert health["worker_id"] == starts[1]["worker_id"]
    assert server.worker_pid() != first_pid
    # The new worker takes new jobs.
    assert client.post("/v1/generate", json=TINY).json()["status"] == "succeeded"
    assert (
        stream_events(client, job_id, last_event_id=events[-2].id) == events[-1:]
    )  # the log is stable


# -- a crash of the whole service, then a restart ----------------------------------------


def test_restart_after_a_crash_runs_every_accepted_job(
    server_factory: Callable[..., Server],
) -> None:
    first = server_factory()
    first.wait_healthy()
    client = first.client
    running = submit(client, {"prompt": "crash", "size": "256x256", "steps": 40})["id"]
    wait_running(client, running)
    queued = [submit(client, {**TINY, "seed": seed})["id"] for seed in range(4)]
    urgent = submit(client, {**TINY, "priority": "urgent"})["id"]
    assert get_job(client, running)["status"] == "running"
    first.crash()

    second = server_factory(data_dir=first.data_dir)
    second.wait_healthy()
    jobs = {job_id: wait_terminal(second.client, job_id) for job_id in [running, *queued, urgent]}
    assert {job_id: job["status"] for job_id, job in jobs.items()} == dict.fromkeys(
        jobs, "succeeded"
    )
    assert jobs[running]["attempts"] == 2
    assert all(jobs[job_id]["attempts"] == 1 for job_id in [*queued, urgent])
    for job_id in jobs:
        events = stream_events(second.client, job_id)
        assert [e.type for e in events].count("completed") == 1
        assert asset_files(first.data_dir, job_id) == ["0.png", "0.thumb.webp"]
    reasons = [e.data.get("reason") for e in stream_events(second.client, running)]
    assert "worker_lost" in reasons
    status = second.client.get("/status").json()
    assert status["running"] == 0
    assert sum(status["queue"].values()) == 0


def test_the_worker_does_not_outlive_a_killed_serve(server_factory: Callable[..., Server]) -> None:
    server = server_factory()
    server.wait_healthy()
    worker_pid = server.worker_pid()
    assert server.process is not None
    server.process.kill()
    server.process.wait(timeout=30)
    deadline = time.monotonic() + 10  # heartbeat_timeout_s is 3
    while _alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker_pid), "the worker still runs 10 s after serve was killed"


# -- Ctrl-C ------------------------------------------------------------------------------


def test_ctrl_c_drains_the_running_job_and_exits_0(
    server_factory: Callable[..., Server],
) -> None:
    server = server_factory()
    server.wait_healthy()
    client = server.client
    job_id = submit(client, {"prompt": "drain", "size": "256x256", "steps": 30})["id"]
    wait_running(client, job_id)
    worker_pid = server.worker_pid()
    assert server.process is not None
    server.process.send_signal(signal.SIGINT)
    try:
        code = server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not exit after SIGINT:\n{server.log_tail()}")
    assert code == 0, server.log_tail()
    assert not _alive(worker_pid)

    broker = SqliteBroker(server.data_dir / "jobs.db")
    try:
        job = broker.get(job_id)
        stats = broker.stats()
    finally:
        broker.close()
    assert job.status.value == "succeeded", server.log_tail()
    assert job.attempts == 1
    assert stats.running == 0
    assert sum(stats.queued.values()) == 0
    assert asset_files(server.data_dir, job_id) == ["0.png", "0.thumb.webp"]
