"""create_app(settings): builds the services, mounts the routers. No globals."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sdworker import __version__
from sdworker.api.dialects import mount_dialects
from sdworker.api.dialects.edge import queue_handler
from sdworker.api.errors import install_error_handlers
from sdworker.api.metrics import build_metrics
from sdworker.api.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from sdworker.api.routes import assets, catalog, jobs, system
from sdworker.api.services import Services
from sdworker.backends import build_broker, build_storage
from sdworker.edge_queue import EdgeQueueConsumer
from sdworker.loras import LoraLibrary
from sdworker.model_registry import load_model_registry
from sdworker.settings import Settings
from sdworker.webhooks import WebhookSender

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, manage_worker: bool = False) -> FastAPI:
    """The API app. With manage_worker (serve), it starts and supervises a worker process
    for its lifetime and drains it on shutdown."""
    broker = build_broker(settings)
    registry, requests, latency = build_metrics(broker)
    services = Services(
        settings=settings,
        broker=broker,
        storage=build_storage(settings),
        registry=registry,
        webhooks=WebhookSender(settings, broker),
        library=LoraLibrary.from_settings(settings),
        models=load_model_registry(settings),
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_worker:
            from sdworker.supervisor import WorkerSupervisor

            services.supervisor = WorkerSupervisor(
                settings, broker, on_reclaimed=services.webhooks.notify_ended
            )
            services.supervisor.start()
        edge_queue = _edge_queue(services)
        try:
            yield
        finally:
            if edge_queue is not None:
                edge_queue.stop()
            if services.supervisor is not None:
                log.info("draining the worker (up to %ss)", settings.drain_timeout_s)
                services.supervisor.stop()
            services.webhooks.close(timeout_s=settings.drain_timeout_s)
            broker.close()

    app = FastAPI(
        title="sdworker",
        version=__version__,
        description="Self-hosted diffusion generation: submit jobs, follow progress over "
        "SSE, fetch PNGs and WEBP thumbnails. Also speaks AUTOMATIC1111, OpenAI Images, "
        "RunPod and the protocols of the services it replaces (see the dialect tags).",
        lifespan=lifespan,
    )
    app.state.services = services
    install_error_handlers(app)
    native = [jobs.router, assets.router, system.router, catalog.router]
    for router in native:
        app.include_router(router)
    paths = mount_dialects(app, settings, native)
    # Health and readiness checks stay open: the native one and the dialects' own.
    open_paths = frozenset(path for path in paths if path.endswith(("/health", "/ready")))
    # Added last = outermost: metrics see every response, auth runs before body reads.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_key_list, open_paths=open_paths)
    app.add_middleware(MetricsMiddleware, requests=requests, latency=latency)
    return app


def _edge_queue(services: Services) -> EdgeQueueConsumer | None:
    """The consumer of the edge system's Redis list, when SDWORKER_EDGE_QUEUE_URL is set."""
    if not services.settings.edge_queue_url.get_secret_value():
        return None
    consumer = EdgeQueueConsumer(services.settings, queue_handler(services))
    consumer.start()
    return consumer
