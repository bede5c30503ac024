"""`sdworker candle-worker`'s runtime: the API (with its supervised worker) under
uvicorn, and beside it the client that registers with the orchestrator and sends it
heartbeats (sdworker.orchestrator), stopped with a last `stopped` message."""

from __future__ import annotations

import signal

import uvicorn
from fastapi import FastAPI

from sdworker.backends import build_broker
from sdworker.orchestrator import Identity, OrchestratorClient, broker_probe
from sdworker.settings import Settings


def run_candle_worker(
    settings: Settings, application: FastAPI, sd_version: str, interval_s: float | None
) -> None:
    """Serve until stopped (Ctrl-C or SIGTERM), keeping the orchestrator informed."""
    server = uvicorn.Server(
        uvicorn.Config(application, host=settings.host, port=settings.port, log_level="info")
    )
    assert settings.worker_id is not None  # exported from --worker-id
    client, broker = None, None
    if settings.orchestrator_url:
        broker = build_broker(settings)
        client = OrchestratorClient(
            settings.orchestrator_url,
            Identity(settings.worker_id, settings.port, settings.base_url, sd_version),
            broker_probe(broker, settings, settings.worker_id),
            interval_s=interval_s or settings.heartbeat_interval_s,
            ready=lambda: server.started,
        )
        client.start()
    # uvicorn re-raises a SIGTERM it drained on; end with a clean exit instead, so the
    # orchestrator is told that this worker stopped.
    previous = signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if client is not None:
            client.stop()
        if broker is not None:
            broker.close()


def _exit_cleanly(_signal: int, _frame: object) -> None:
    raise SystemExit(0)
