"""sdworker as a RunPod serverless worker: `python -m sdworker.runpod_handler`.

RunPod hands each job to `handler(job)` in the container that has the GPU, so the job
runs here, in-process, through the same path as a served job: the input is translated
(api/dialects/runpod_format.py, shared with the HTTP dialect), validated and queued on a
private SQLite queue, run by a sdworker Worker (`run_once`), stored, and answered in the
replaced worker's output shape. Bad input and failed jobs answer `{"error": "..."}`,
which RunPod reports as a FAILED job.

Storage is the deployment's (build_storage): with `use_cloud_storage` the output holds
the stored assets' URLs, which needs S3 settings (SDWORKER_S3_BUCKET ...), as local disk
in a serverless container is reachable by nobody; otherwise the output holds data URIs
and the assets are deleted once read. The job's top-level `webhook` is RunPod's own
(the platform delivers it), so sdworker sends none.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from sdworker.api.dialects.base import build_spec
from sdworker.api.dialects.runpod_format import (
    NAMES,
    error_of,
    job_output,
    parse_input,
    spec_fields,
    wants_urls,
)
from sdworker.api.jobflow import enqueue_job
from sdworker.api.services import Services
from sdworker.backends import build_storage
from sdworker.broker.sqlite import SqliteBroker
from sdworker.errors import InvalidJobError, SdworkerError
from sdworker.jobs import Job, JobStatus
from sdworker.loras import LoraLibrary
from sdworker.model_registry import load_model_registry
from sdworker.settings import Settings
from sdworker.webhooks import WebhookSender
from sdworker.worker import FatalEngineError, Worker

if TYPE_CHECKING:
    from sdworker.worker import EngineLike

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass
class _Runtime:
    """What the handler builds once: services (for validation), a worker, storage."""

    services: Services
    worker: Worker

    @classmethod
    def build(cls, settings: Settings, engine: EngineLike | None) -> _Runtime:
        if engine is None:
            from sdworker.engine.engine import Engine  # torch: loaded on the first job

            engine = Engine(settings, allow_local_paths=False)  # callers may not read our disk
        # A queue of its own: only this process's job is ever in it, so run_once runs it.
        # (A shared broker would let this worker take other workers' jobs.)
        queue = Path(tempfile.mkdtemp(prefix="sdworker-runpod-")) / "jobs.db"
        broker = SqliteBroker(queue, max_attempts=1)
        storage = build_storage(settings)
        services = Services(
            settings=settings,
            broker=broker,
            storage=storage,
            registry=CollectorRegistry(),
            webhooks=WebhookSender(settings, broker),
            library=LoraLibrary.from_settings(settings),
            models=load_model_registry(settings),
        )
        device = str(getattr(engine, "device", ""))
        worker = Worker(
            settings, broker, storage, engine, f"runpod-{socket.gethostname()}", device=device
        )
        return cls(services, worker)

    def handle(self, event: dict[str, Any]) -> dict[str, Any]:
        data = parse_input(event.get("input"))
        if data.use_cloud_storage and not self.services.settings.s3_bucket:
            raise InvalidJobError(
                "use_cloud_storage: no cloud storage is configured on this worker; set "
                "SDWORKER_S3_BUCKET (or AWS_S3_BUCKET) and its credentials",
                field="use_cloud_storage",
            )
        refiner = self.services.features_of(None).refiner
        spec = build_spec(spec_fields(data, refiner_available=refiner), NAMES)
        job, _ = enqueue_job(spec, self.services)
        while not self.services.broker.get(job.id).status.is_terminal():
            if not self.worker.run_once():  # nothing to claim: it cannot end (never so)
                raise RuntimeError(f"job {job.id} is not terminal and not queued")
        return self._answer(self.services.broker.get(job.id))

    def _answer(self, job: Job) -> dict[str, Any]:
        if job.status is not JobStatus.SUCCEEDED or job.result is None:
            return {"error": error_of(job)}
        if wants_urls(job):
            return job_output(job, None)
        storage = self.services.storage
        payloads = [storage.get(asset.key).data for asset in job.result.assets]
        output = job_output(job, payloads)
        for asset in job.result.assets:  # answered inline: nothing keeps them
            storage.delete(asset.key)
            storage.delete(asset.thumbnail_key)
        return output


def make_handler(settings: Settings | None = None, *, engine: EngineLike | None = None) -> Handler:
    """The RunPod handler. Settings (from the environment when None), the engine
    (built and loaded on the first job unless given), the queue and the worker are built
    on the first call, not at import."""
    runtime: _Runtime | None = None
    lock = threading.Lock()  # one job at a time: a pipeline is not thread-safe

    def handler(job: dict[str, Any]) -> dict[str, Any]:
        nonlocal runtime
        with lock:
            try:
                if runtime is None:
                    runtime = _Runtime.build(_handler_settings(settings), engine)
                return runtime.handle(job)
            except SdworkerError as exc:
                return {"error": exc.message}
            except FatalEngineError as exc:
                # The device is gone: RunPod replaces this worker (stopPod).
                log.error("device unusable: %s", exc)
                return {"error": f"the device failed: {exc}", "refresh_worker": True}

    return handler


def _handler_settings(settings: Settings | None) -> Settings:
    settings = settings or Settings()
    # One job per call: waiting for batch partners would only add latency.
    return settings.model_copy(update={"batch_max_jobs": 1})


def main() -> None:
    import runpod

    runpod.serverless.start({"handler": make_handler()})


if __name__ == "__main__":
    main()
