"""The worker loop: claim -> run the engine -> encode -> store -> complete, with
heartbeats, throttled progress and cancellation. One worker per device."""

from __future__ import annotations

import base64
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from sdworker.broker.base import Broker, WorkerInfo
from sdworker.errors import OutOfMemoryError, SdworkerError
from sdworker.jobs import (
    DEFAULT_OUTPUT_QUALITY,
    Asset,
    EventType,
    Job,
    JobError,
    JobProgress,
    JobResult,
    JobStatus,
    JobTimings,
    LatentsOutput,
    VideoInfo,
    batch_key_of,
)
from sdworker.media import encode_image, generation_parameters, thumbnail_webp
from sdworker.settings import Settings
from sdworker.storage.base import (
    Storage,
    content_type_of,
    image_key,
    thumbnail_key,
    video_key,
)
from sdworker.webhooks import TERMINAL_EVENTS, WebhookSender

if TYPE_CHECKING:
    from sdworker.engine.engine import Cancelled, EngineResult
    from sdworker.jobs import JobSpec

log = logging.getLogger(__name__)


MAX_BACKOFF_S = 5.0
GATHER_POLL_S = 0.005  # how often a worker looks for more jobs while gathering a batch
FINAL_WRITE_ATTEMPTS = 8  # about 40 s of retries before leaving the job to reclaim

# Exit status that tells the supervisor the device is unusable (e.g. a lost CUDA context).
EXIT_FATAL_ENGINE = 70


class EngineLike(Protocol):
    """What the worker needs of an engine (the real one, or a fake in tests)."""

    def load(self, model: str | None = None) -> object: ...

    def run(
        self,
        spec: JobSpec,
        on_step: Callable[[int, int], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> EngineResult | Cancelled: ...

    def run_batch(
        self,
        specs: list[JobSpec],
        on_step: Callable[[int, int], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> list[EngineResult] | Cancelled: ...


class FatalEngineError(Exception):
    """The device can no longer run jobs; the process must exit and be restarted."""


def is_fatal_device_error(exc: BaseException) -> bool:
    """CUDA errors that poison the context: nothing more can run in this process."""
    text = str(exc)
    return "CUDA error" in text or "device-side assert" in text or "illegal memory access" in text


class Worker:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        storage: Storage,
        engine: EngineLike,
        worker_id: str,
        *,
        device: str = "",
        parent_pid: int | None = None,
        webhooks: WebhookSender | None = None,
    ) -> None:
        """parent_pid: stop (after the running job) once that process is gone, so a
        worker never outlives the `serve` that started it."""
        self._settings = settings
        self._parent_pid = parent_pid
        self._webhooks = webhooks
        self._broker = broker
        self._storage = storage
        self._engine = engine
        self.id = worker_id
        self._info = WorkerInfo(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            device=device,
            model=settings.model,
            started_at=datetime.now(UTC),
        )
        self._stop = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Finish the running job (if any), then leave the loop."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self) -> None:
        """Load the model, then claim and run jobs until stopped."""
        heartbeats = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeats.start()
        loaded = self._engine.load()
        speed = getattr(loaded, "speed", None)
        if speed is not None:
            self._info.fast_path = speed.describe()
        self._info.model_loaded = True
        self._preferred_models()  # records the loaded models for the heartbeat
        models = getattr(self._engine, "models", None)
        self._info.memory_budget_bytes = getattr(models, "budget_bytes", None)
        self._send_heartbeat()
        last_reclaim = 0.0
        outage = 0  # consecutive broker errors: back off while the broker is away
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_reclaim > self._settings.heartbeat_interval_s:
                    reclaimed = self._broker.reclaim(
                        stale_after_s=self._settings.heartbeat_timeout_s
                    )
                    last_reclaim = time.monotonic()
                    if reclaimed and self._webhooks is not None:
                        self._webhooks.notify_ended(reclaimed)
                busy = self.run_once()
                outage = 0
            except FatalEngineError:
                raise
            except Exception:
                outage += 1
                log.warning("broker unavailable (attempt %s); retrying", outage, exc_info=True)
                self._stop.wait(min(self._settings.poll_interval_s * 2**outage, MAX_BACKOFF_S))
                continue
            if not busy:
                self._stop.wait(self._settings.poll_interval_s)
        self._info.current_job = None
        self._send_heartbeat()

    def run_once(self) -> bool:
        """Claim and process one job (or a batch of compatible ones); False when the
        queue was empty."""
        job = self._broker.claim(
            self.id,
            prefer_models=self._preferred_models(),
            affinity_wait_s=self._settings.model_affinity_wait_s,
        )
        if job is None:
            return False
        self._info.current_job = job.id
        try:
            jobs = self._gather(job)
            if len(jobs) == 1:
                self.process(job)
            else:
                self.process_batch(jobs)
        finally:
            self._info.current_job = None
            self._info.batch_jobs = []
        return True

    def _preferred_models(self) -> list[str]:
        """The model keys of queued jobs this worker runs without loading anything:
        its loaded models by name, and "" (no model named) when the default is loaded."""
        loaded_models = getattr(self._engine, "loaded_models", None)
        if loaded_models is None:
            return []
        names: list[str] = loaded_models()
        self._info.models_loaded = names
        refiner_loaded = getattr(self._engine, "refiner_loaded", None)
        self._info.refiner_loaded = bool(refiner_loaded and refiner_loaded())
        return [*names, ""] if self._settings.model in names else names

    def _gather(self, first: Job) -> list[Job]:
        """Cross-job batching: claim the queue's next jobs while they are compatible with
        the first (same batch key), up to the job and image limits, waiting at most the
        gather window for more to arrive."""
        settings = self._settings
        key = batch_key_of(first.spec)
        if settings.batch_max_jobs <= 1 or key is None:
            return [first]
        jobs, images = [first], first.spec.num_images
        deadline = time.monotonic() + settings.batch_window_s
        while len(jobs) < settings.batch_max_jobs and images < settings.batch_max_images:
            try:
                job = self._broker.claim(
                    self.id, batch_key=key, max_images=settings.batch_max_images - images
                )
            except Exception:  # run what we hold; the broker is retried on the next claim
                log.warning("could not claim more jobs for a batch", exc_info=True)
                break
            if job is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(GATHER_POLL_S, remaining))
                continue
            jobs.append(job)
            images += job.spec.num_images
            self._info.batch_jobs = [held.id for held in jobs]
        return jobs

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self._settings.heartbeat_interval_s):
            if self._parent_pid is not None and os.getppid() != self._parent_pid:
                log.warning("worker %s: parent %s is gone; stopping", self.id, self._parent_pid)
                self.stop()
            self._send_heartbeat()

    def _send_heartbeat(self) -> None:
        try:
            self._info.vram_used_bytes = _vram_used_bytes(self._info.device)
            self._broker.heartbeat(self._info)
        except Exception:  # a missed heartbeat must not kill the worker
            log.exception("heartbeat failed")

    # -- one job -----------------------------------------------------------------------

    def process(self, job: Job) -> None:
        """Run a claimed job to a terminal state (or re-raise a fatal device error), then
        send its webhook."""
        try:
            self._process(job)
        finally:
            self._notify_terminal(job.id)

    def _notify_terminal(self, job_id: str) -> None:
        if self._webhooks is None:
            return
        try:
            job = self._broker.get(job_id)
        except Exception:  # never let a webhook lookup hide the job's own outcome
            log.exception("could not read job %s for its webhook", job_id)
            return
        event = TERMINAL_EVENTS.get(job.status)
        if event is not None and job.worker_id == self.id:
            self._webhooks.notify(job, event)

    def process_batch(self, jobs: list[Job]) -> None:
        """Run claimed compatible jobs in one batched engine call, then store and finish
        each on its own. If the batch fails, each job is run alone, so that one job's
        bad input or a batch too large for memory fails only the jobs it should."""
        live = {job.id: job for job in jobs}  # jobs not cancelled meanwhile
        try:
            finished = self._run_batch(jobs, live)
        except Exception as exc:
            if is_fatal_device_error(exc):
                # Which job broke the device is unknown: none is failed. They stay
                # running on this worker, which exits; reclaim re-queues them (a job that
                # keeps killing workers ends `worker_lost` after its attempts).
                raise FatalEngineError(str(exc)) from exc
            log.warning("a batch of %s jobs failed; running each alone", len(jobs), exc_info=True)
            for job in jobs:
                if self._still_held(job):
                    self._info.current_job = job.id
                    self.process(job)
            return
        for job_id in finished:
            self._notify_terminal(job_id)

    def _still_held(self, job: Job) -> bool:
        try:
            current = self._broker.get(job.id)
        except Exception:
            return True  # unknown: run it; completion is idempotent
        return current.status == JobStatus.RUNNING and current.worker_id == self.id

    def _run_batch(self, jobs: list[Job], live: dict[str, Job]) -> list[str]:
        """Returns the jobs it finished; those cancelled meanwhile leave `live` and are
        notified at once."""
        from sdworker.engine.engine import Cancelled

        interval = self._settings.progress_interval_s
        last_sent = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last_sent
            # As for a lone job, a cancel that lands on the last step is too late.
            cancelled = [i for i in live if self._cancel_requested(i)] if step < total else []
            for job_id in cancelled:
                # A cancelled job leaves the batch at once; the others run on.
                self._reliably(self._broker.mark_canceled, job_id, self.id)
                self._notify_terminal(job_id)
                del live[job_id]
            now = time.monotonic()
            if step >= total or now - last_sent >= interval:
                last_sent = now
                for job in live.values():
                    self._report_progress(job, step, total)

        _reset_peak_vram(self._info.device)
        outcome = self._engine.run_batch(
            [job.spec for job in jobs], on_step=on_step, is_cancelled=lambda: not live
        )
        if isinstance(outcome, Cancelled):
            return []  # every job was cancelled and marked so in on_step
        for job, result in zip(jobs, outcome, strict=True):
            if job.id not in live:
                continue
            try:
                stored = self._store(job, result)
            except Exception as exc:  # one job's storage failure must not fail the others
                log.exception("storing job %s failed", job.id)
                self._fail(job, "internal_error", f"{type(exc).__name__}: {exc}")
                continue
            self._reliably(self._broker.complete, job.id, self.id, stored)
        return list(live)

    def _process(self, job: Job) -> None:
        try:
            self._run(job)
        except OutOfMemoryError as exc:  # memory is already freed by the engine
            self._fail(job, exc.code, exc.message)
        except SdworkerError as exc:
            self._fail(job, exc.code, exc.message)
        except Exception as exc:
            if is_fatal_device_error(exc):
                self._fail(job, "engine_fatal", f"the device failed: {exc}")
                raise FatalEngineError(str(exc)) from exc
            log.exception("job %s failed", job.id)
            self._fail(job, "internal_error", f"{type(exc).__name__}: {exc}")

    def _fail(self, job: Job, code: str, message: str) -> None:
        self._reliably(self._broker.fail, job.id, self.id, JobError(code=code, message=message))

    def _reliably(self, call: Callable[..., object], *args: object) -> None:
        """A job's final broker write, retried through a broker outage. If it never gets
        through, the job is left running: its heartbeat stops and it is reclaimed and run
        again (assets have fixed keys, so a re-run overwrites them)."""
        for attempt in range(1, FINAL_WRITE_ATTEMPTS + 1):
            try:
                call(*args)
                return
            except Exception:
                log.warning("broker write failed (attempt %s)", attempt, exc_info=True)
                time.sleep(min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF_S))
        log.error("giving up on a broker write for job %s; it will be reclaimed", args[0])

    def _progress(self, job: Job, step: int, total: int) -> None:
        """Progress is best effort: a broker hiccup must not fail the job."""
        try:
            self._broker.progress(job.id, self.id, step, total)
        except Exception:
            log.warning("could not record progress of job %s", job.id, exc_info=True)

    def _report_progress(self, job: Job, step: int, total: int) -> None:
        """A progress event, and a progress webhook when the job asked for them."""
        self._progress(job, step, total)
        if self._webhooks is not None and job.spec.webhook_progress and step < total:
            progress = JobProgress(step=step, total_steps=total)
            self._webhooks.notify(job.model_copy(update={"progress": progress}), EventType.PROGRESS)

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self._broker.cancel_requested(job_id)
        except Exception:  # unknown for now: keep going, ask again next step
            return False

    def _run(self, job: Job) -> None:
        from sdworker.engine.engine import Cancelled

        interval = self._settings.progress_interval_s
        last_sent = 0.0

        def on_step(step: int, total: int) -> None:
            nonlocal last_sent
            now = time.monotonic()
            if step >= total or now - last_sent >= interval:
                last_sent = now
                self._report_progress(job, step, total)

        _reset_peak_vram(self._info.device)
        outcome = self._engine.run(
            job.spec, on_step=on_step, is_cancelled=lambda: self._cancel_requested(job.id)
        )
        if isinstance(outcome, Cancelled):
            self._reliably(self._broker.mark_canceled, job.id, self.id)
            return
        result = self._store(job, outcome)
        self._reliably(self._broker.complete, job.id, self.id, result)

    def _store_videos(
        self, job: Job, outcome: EngineResult
    ) -> tuple[list[Asset], float, float, VideoInfo]:
        """MP4 (H.264, yuv420p) per video, its first frame as the 256 px WEBP poster."""
        from sdworker.video import encode_mp4, poster_webp

        plan = outcome.plan
        assert outcome.videos is not None and plan.video is not None
        encode_s = store_s = 0.0
        assets = []
        for index, (frames, seed) in enumerate(zip(outcome.videos, outcome.seeds, strict=True)):
            started = time.perf_counter()
            data, info = encode_mp4(frames, plan.video.fps)
            poster = poster_webp(frames[0])
            encoded = time.perf_counter()
            key = video_key(job.owner, job.id, index)
            thumb_key = thumbnail_key(job.owner, job.id, index)
            url = self._storage.put(key, data, "video/mp4")
            thumb_url = self._storage.put(thumb_key, poster, "image/webp")
            encode_s += encoded - started
            store_s += time.perf_counter() - encoded
            video_info = VideoInfo.model_validate(info.as_dict())
            assets.append(
                Asset(
                    type="video",
                    key=key,
                    url=url,
                    thumbnail_key=thumb_key,
                    thumbnail_url=thumb_url,
                    content_type="video/mp4",
                    base64=base64.b64encode(data).decode() if job.spec.return_base64 else None,
                    metadata={
                        **video_info.model_dump(),
                        "format": "mp4",
                        "codec": "h264",
                        "seed": seed,
                        "steps": plan.num_inference_steps,
                        "guidance_scale": plan.guidance_scale,
                        "scheduler": plan.scheduler,
                        "file_size_bytes": len(data),
                        "asset_index": index,
                        "pipeline": plan.task.value,
                        "negative_prompt_used": plan.negative_prompt,
                    },
                )
            )
        return assets, encode_s, store_s, video_info

    def _store(self, job: Job, outcome: EngineResult) -> JobResult:
        spec, plan = job.spec, outcome.plan
        fmt = spec.output_format.value
        encode_s = store_s = 0.0
        assets: list[Asset] = []
        video_info = None
        pairs = list(zip(outcome.images, outcome.seeds, strict=True))
        if outcome.videos is not None:
            assets, encode_s, store_s, video_info = self._store_videos(job, outcome)
            pairs = []
        for index, (image, seed) in enumerate(pairs):
            started = time.perf_counter()
            parameters = generation_parameters(plan, seed, outcome.model, image.size)
            quality = spec.output_quality or DEFAULT_OUTPUT_QUALITY
            main = encode_image(image, fmt, parameters, quality)
            thumb = thumbnail_webp(image)
            encoded = time.perf_counter()
            key = image_key(job.owner, job.id, index, fmt)
            thumb_key = thumbnail_key(job.owner, job.id, index)
            url = self._storage.put(key, main, content_type_of(key))
            thumb_url = self._storage.put(thumb_key, thumb, "image/webp")
            encode_s += encoded - started
            store_s += time.perf_counter() - encoded
            assets.append(
                Asset(
                    key=key,
                    url=url,
                    thumbnail_key=thumb_key,
                    thumbnail_url=thumb_url,
                    content_type=content_type_of(key),
                    base64=base64.b64encode(main).decode() if spec.return_base64 else None,
                    metadata={
                        "width": image.width,
                        "height": image.height,
                        "format": fmt,
                        "seed": seed,
                        "steps": plan.num_inference_steps,
                        "denoise_steps": plan.denoise_steps,
                        "guidance_scale": plan.guidance_scale,
                        "scheduler": plan.scheduler,
                        "file_size_bytes": len(main),
                        "asset_index": index,
                        "batch_size": len(outcome.images),
                        "pipeline": plan.task.value,
                        "mode": plan.mode.value,
                        "denoise_strength": plan.strength,
                        "resize_policy": plan.resize_mode.value if plan.image else None,
                        "negative_prompt_used": plan.negative_prompt,
                        "loras": [{"name": x.name, "weight": x.weight} for x in plan.loras],
                        "refiner": plan.refiner.mode.value if plan.refiner else None,
                        "reference_type": plan.reference.type.value if plan.reference else None,
                        "upscale": (
                            {"factor": plan.upscale.factor, "upscaler": plan.upscale.upscaler}
                            if plan.upscale
                            else None
                        ),
                    },
                )
            )
        latents = None
        if outcome.latents is not None:
            latents = LatentsOutput(
                base64=base64.b64encode(outcome.latents.data).decode(),
                shape=list(outcome.latents.shape),
            )
        queue_s = (job.started_at - job.created_at).total_seconds() if job.started_at else 0.0
        return JobResult(
            assets=assets,
            seeds=outcome.seeds,
            model=outcome.model,
            device=outcome.device,
            timings=JobTimings(
                queue_s=queue_s,
                load_s=outcome.timings["load_s"],
                inference_s=outcome.timings["inference_s"],
                encode_s=encode_s,
                store_s=store_s,
                total_s=(datetime.now(UTC) - job.created_at).total_seconds(),
            ),
            warnings=outcome.warnings,
            latents=latents,
            vram_used_bytes=_peak_vram_bytes(self._info.device),
            batch_jobs=outcome.batch_jobs,
            video_info=video_info,
        )


def _cuda(device: str) -> Any:
    """torch.cuda when this worker runs on a GPU (torch is loaded by then)."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda


def _vram_used_bytes(device: str) -> int | None:
    """Device memory held by this process now, on the worker's own GPU."""
    cuda = _cuda(device)
    return int(cuda.memory_allocated(device)) if cuda else None


def _reset_peak_vram(device: str) -> None:
    cuda = _cuda(device)
    if cuda:
        cuda.reset_peak_memory_stats(device)


def _peak_vram_bytes(device: str) -> int | None:
    """Most device memory held during the job."""
    cuda = _cuda(device)
    return int(cuda.max_memory_allocated(device)) if cuda else None


def run_worker_process(settings: Settings, worker_id: str, parent_pid: int | None = None) -> int:
    """Entry of a worker process: SIGTERM/SIGINT drain (the running job finishes), a
    second signal exits at once (the supervisor re-queues the job). Returns the exit code."""
    import signal

    from sdworker.backends import build_broker, build_storage
    from sdworker.engine.engine import Engine

    engine = Engine(settings, allow_local_paths=False)  # callers may not read our disk
    broker = build_broker(settings)
    webhooks = WebhookSender(settings, broker)
    worker = Worker(
        settings,
        broker,
        build_storage(settings),
        engine,
        worker_id,
        device=str(engine.device),
        parent_pid=parent_pid,
        webhooks=webhooks,
    )

    def on_signal(signum: int, _frame: object) -> None:
        if worker.stopping:
            raise SystemExit(128 + signum)
        log.info("worker %s draining after signal %s", worker_id, signum)
        worker.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        worker.run_forever()
    except FatalEngineError:
        log.error("worker %s: device unusable, exiting for a restart", worker_id)
        return EXIT_FATAL_ENGINE
    finally:
        webhooks.close(timeout_s=settings.drain_timeout_s)
        broker.close()
    return 0
