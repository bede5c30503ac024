"""A live service for the dialect tests: uvicorn on a loopback port serving create_app,
and a worker thread running the real tiny SDXL engine on the same SQLite queue, so the
dialects' real clients (openai, webuiapi, runpod, SSE libraries) talk to real HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sdworker.api.app import create_app
from sdworker.backends import build_broker, build_storage
from sdworker.settings import Settings
from sdworker.webhooks import WebhookSender
from sdworker.worker import Worker
from tests.api.conftest import client, make_client, make_settings

# The in-process API fixtures (TestClient, no worker) serve these tests too.
__all__ = ["client", "make_client", "make_settings"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LiveService:
    url: str
    settings: Settings
    client: httpx.Client
    worker: Worker


@contextmanager
def live_service(
    data_dir: Path, cache_dir: Path, engine: Any, **overrides: Any
) -> Iterator[LiveService]:
    """Start the API and a worker; stop both (worker drained first) on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "cache_dir": cache_dir,
        "model": "tiny-sdxl",
        "device": "cpu",
        "port": port,
        "public_url": url,
        "sync_timeout_s": 60.0,
        "poll_interval_s": 0.02,
        "progress_interval_s": 0.0,
        "heartbeat_interval_s": 0.2,
        "fetch_allow": "127.0.0.1",
    }
    settings = Settings(_env_file=None, **(values | overrides))
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    serving.start()
    broker = build_broker(settings)
    webhooks = WebhookSender(settings, broker)
    worker = Worker(
        settings, broker, build_storage(settings), engine, "dialect-worker", webhooks=webhooks
    )
    working = threading.Thread(target=worker.run_forever, name="worker", daemon=True)
    working.start()
    client = httpx.Client(base_url=url, timeout=60.0)
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not serving.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield LiveService(url, settings, client, worker)
    finally:
        client.close()
        worker.stop()
        working.join(60)
        webhooks.close(timeout_s=10)
        broker.close()
        server.should_exit = True
        serving.join(30)


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, engine: Any
) -> Iterator[LiveService]:
    """One live service per test module, default settings (every dialect mounted)."""
    with live_service(tmp_path_factory.mktemp("live"), cache_dir, engine) as service:
        yield service


@pytest.fixture
def make_live(tmp_path: Path, cache_dir: Path, engine: Any) -> Iterator[Callable[..., LiveService]]:
    """A live service of its own with settings overrides, stopped at teardown."""
    stack: list[Any] = []

    def make(**overrides: Any) -> LiveService:
        context = live_service(tmp_path / f"live{len(stack)}", cache_dir, engine, **overrides)
        stack.append(context)
        return context.__enter__()

    yield make
    for context in reversed(stack):
        context.__exit__(None, None, None)
