"""Cross-job batching in the worker: Worker.run_once gathers compatible queued jobs (equal
jobs.batch_key_of, within batch_max_jobs / batch_max_images, waiting at most
batch_window_s) and runs them in one Engine.run_batch call, then stores and finishes each
job on its own.

The fidelity tests use the real tiny engine; the queue-shape, cancel, failure, progress,
webhook and Redis tests use a recording fake engine. Real broker, real local storage.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdworker.broker.sqlite import SqliteBroker
from sdworker.engine.engine import Cancelled, Engine, EngineResult
from sdworker.errors import OutOfMemoryError
from sdworker.families import SDXL
from sdworker.jobs import EventType, Job, JobSpec, JobStatus, batch_key_of
from sdworker.planning import plan_generation
from sdworker.settings import Settings
from sdworker.storage.local import LocalStorage
from sdworker.worker import FatalEngineError, Worker
from tests.conftest import gradient_image, half_mask, max_pixel_difference

S = JobStatus

# Batched kernels may round differently from a lone run: at most this many levels (of 255)
# per channel between an image made in a batch and the same image made alone.
TOLERANCE = 2

Parts = tuple[Settings, SqliteBroker, LocalStorage]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, progress_interval_s=0, heartbeat_interval_s=0.1,
        poll_interval_s=0.02,
    )  # fmt: skip
    broker = SqliteBroker(settings.database_path)
    yield settings, broker, LocalStorage(settings.assets_dir, "http://test")
    broker.close()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from threads, and on a small CPU shared with other
    work torch's thread pool can make each step a hundred times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_worker(
    parts: Parts,
    engine: Any,
    *,
    broker: Any = None,
    storage: Any = None,
    webhooks: Any = None,
    **overrides: Any,
) -> Worker:
    """A worker on the test's settings (with overrides), broker and storage."""
    settings, own_broker, own_storage = parts
    return Worker(
        settings.model_copy(update=overrides),
        broker or own_broker,
        storage or own_storage,
        engine,
        "w1",
        webhooks=webhooks,
    )


def seed_colour(seed: int) -> tuple[int, int, int]:
    return (seed % 256, (seed * 7) % 256, 100)


class BatchEngine:
    """A fake engine that records every call. Images are solid, coloured by their seed,
    so a stored image tells which seed (and so which job) it was made for.

    step_hook(step) runs before the worker's on_step at each step (to cancel from there);
    batch_error is raised by run_batch at the start of step fail_at_step (0: before any
    step); run() never fails."""

    def __init__(
        self,
        *,
        step_s: float = 0.0,
        batch_error: Exception | None = None,
        fail_at_step: int = 0,
        step_hook: Callable[[int], None] | None = None,
        before_steps: Callable[[], None] | None = None,
    ) -> None:
        self.step_s, self.batch_error, self.fail_at_step = step_s, batch_error, fail_at_step
        self.step_hook, self.before_steps = step_hook, before_steps
        self.calls: list[tuple[str, list[str]]] = []  # ("run" | "batch", prompts)
        self.batch_keys: list[set[str | None]] = []
        self.stopped_at: list[tuple[int, int]] = []  # (step, total) of each cancelled call

    def load(self, model: str | None = None) -> object:
        return object()

    def run(self, spec: JobSpec, on_step: Any = None, is_cancelled: Any = None) -> Any:
        self.calls.append(("run", [spec.prompt]))
        outcome = self._steps([spec], on_step, is_cancelled, None)
        return outcome if isinstance(outcome, Cancelled) else self._results([spec])[0]

    def run_batch(self, specs: list[JobSpec], on_step: Any = None, is_cancelled: Any = None) -> Any:
        self.calls.append(("batch", [spec.prompt for spec in specs]))
        self.batch_keys.append({batch_key_of(spec) for spec in specs})
        outcome = self._steps(specs, on_step, is_cancelled, self.batch_error)
        return outcome if isinstance(outcome, Cancelled) else self._results(specs)

    def _steps(
        self, specs: list[JobSpec], on_step: Any, is_cancelled: Any, error: Exception | None
    ) -> Cancelled | None:
        if self.before_steps is not None:
            self.before_steps()
        total = plan_generation(specs[0], SDXL, max_num_images=8).denoise_steps
        for step in range(1, total + 1):
            if error is not None and step > self.fail_at_step:
                raise error
            time.sleep(self.step_s)
            if self.step_hook is not None:
                self.step_hook(step)
            if on_step:
                on_step(step, total)
            if is_cancelled and is_cancelled() and step < total:
                self.stopped_at.append((step, total))
                return Cancelled(step=step, total_steps=total)
        return None

    def _results(self, specs: list[JobSpec]) -> list[EngineResult]:
        results = []
        for spec in specs:
            plan = plan_generation(spec, SDXL, max_num_images=8)
            images = [
                Image.new("RGB", (plan.width, plan.height), seed_colour(s)) for s in plan.seeds
            ]
            results.append(
                EngineResult(
                    images=images,
                    seeds=plan.seeds,
                    plan=plan,
                    model="fake",
                    family="sdxl",
                    device="cpu",
                    dtype="fp32",
                    latents=None,
                    timings={"load_s": 0.0, "inference_s": 0.1},
                    batch_jobs=len(specs),
                )
            )
        return results

    def all_batches_compatible(self) -> bool:
        return all(len(keys) == 1 and None not in keys for keys in self.batch_keys)


class RecordingWebhooks:
    """Stands in for WebhookSender: records what the worker asks it to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, EventType, int]] = []  # (job id, event, progress step)

    def notify(self, job: Job, event: EventType) -> None:
        self.sent.append((job.id, event, job.progress.step))

    def notify_ended(self, job_ids: list[str]) -> None:
        raise AssertionError("no job is reclaimed in these tests")

    def terminal(self, job_id: str) -> list[EventType]:
        return [event for i, event, _ in self.sent if i == job_id and event.is_terminal()]


def fake_spec(prompt: str, **fields: Any) -> JobSpec:
    return JobSpec(**({"prompt": prompt, "size": "64x64", "steps": 4, "seed": 1} | fields))


def enqueue(broker: Any, *specs: JobSpec) -> list[Job]:
    return [broker.enqueue(spec)[0] for spec in specs]


def stored_images(storage_root: Path, job: Job) -> list[Image.Image]:
    assert job.result is not None
    images = []
    for asset in job.result.assets:
        with Image.open(storage_root / "assets" / asset.key) as png:
            images.append(png.convert("RGB"))
    return images


def batch_sizes(broker: Any, jobs: list[Job]) -> list[int]:
    sizes = []
    for job in jobs:
        result = broker.get(job.id).result
        assert result is not None, job.spec.prompt
        sizes.append(result.batch_jobs)
    return sizes


def queued(broker: Any) -> int:
    return sum(broker.stats().queued.values())


# --------------------------------------------------------------------------- real engine


def tiny_specs(task: str, folder: Path) -> list[JobSpec]:
    """Three compatible jobs of one task: different prompts, seeds and inputs."""
    common: dict[str, Any] = {"size": "64x64", "steps": 4}
    prompts = ["a red fox in snow", "a blue bird on a wire", "a green frog"]
    seeds = [11, 22, 33]
    counts = [1, 2, 1]
    if task == "text2img":
        inputs: list[dict[str, Any]] = [{}, {}, {}]
    else:
        images = [gradient_image(), gradient_image().transpose(Image.Transpose.ROTATE_90)]
        images.append(gradient_image().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        for index, image in enumerate(images):
            image.save(folder / f"input{index}.png")
        inputs = [{"image": str(folder / f"input{i}.png")} for i in range(3)]
        if task == "img2img":
            common["strength"] = 0.6
        else:  # inpaint: one image per job (multi-image inpainting runs alone)
            half_mask().save(folder / "mask.png")
            for entry in inputs:
                entry["mask"] = str(folder / "mask.png")
            counts = [1, 1, 1]
    return [
        JobSpec(prompt=p, seed=s, num_images=n, **common, **extra)
        for p, s, n, extra in zip(prompts, seeds, counts, inputs, strict=True)
    ]


@pytest.mark.parametrize("task", ["text2img", "img2img", "inpaint"])
def test_compatible_jobs_run_as_one_batch_and_match_lone_runs(
    parts: Parts, engine: Engine, tmp_path: Path, task: str
) -> None:
    """One run_once finishes three compatible jobs in one batched call; each job's stored
    PNGs equal those of its spec run alone through engine.run, within a max pixel
    difference of 2 (TOLERANCE: batched-kernel rounding).

    The session engine trusts local paths (Engine(settings) has allow_local_paths=True),
    which the input images here are; a serving worker builds Engine(allow_local_paths=False).
    """
    _, broker, _ = parts
    specs = tiny_specs(task, tmp_path)
    assert len({batch_key_of(spec) for spec in specs}) == 1
    jobs = enqueue(broker, *specs)

    assert make_worker(parts, engine, batch_max_jobs=4).run_once()

    assert queued(broker) == 0
    finished = [broker.get(job.id) for job in jobs]
    outputs = []
    for job, spec in zip(finished, specs, strict=True):
        assert job.status is S.SUCCEEDED, job.error
        assert job.result is not None
        assert job.result.batch_jobs == 3
        assert len(job.result.assets) == spec.num_images
        assert spec.seed is not None
        assert job.result.seeds == [spec.seed + i for i in range(spec.num_images)]
        assert [a.metadata["seed"] for a in job.result.assets] == job.result.seeds
        assert {a.metadata["pipeline"] for a in job.result.assets} == {task}
        stored = stored_images(tmp_path, job)
        alone = engine.run(spec)
        assert not isinstance(alone, Cancelled) and alone.batch_jobs == 1
        assert len(stored) == len(alone.images) == spec.num_images
        for batched, single in zip(stored, alone.images, strict=True):
            assert batched.size == (64, 64)
            assert max_pixel_difference(batched, single) <= TOLERANCE
        outputs.append(stored)
    # The jobs' images differ from each other by far more than the tolerance, so an image
    # handed to the wrong job (or one job's inputs used for another) would be caught.
    firsts = [images[0] for images in outputs]
    for a in range(3):
        for b in range(a + 1, 3):
            assert max_pixel_difference(firsts[a], firsts[b]) > 10 * TOLERANCE
    if len(outputs[1]) == 2:  # one job of two images: seeds 22 and 23
        assert max_pixel_difference(outputs[1][0], outputs[1][1]) > 10 * TOLERANCE


def test_a_bad_input_in_a_batch_fails_only_its_own_job(
    parts: Parts, engine: Engine, tmp_path: Path
) -> None:
    """The batched call fails on one job's unreadable image: each job then runs alone, the
    bad one fails with its own error, the others succeed with their lone-run images."""
    _, broker, _ = parts
    good = tiny_specs("img2img", tmp_path)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad = good[1].model_copy(update={"image": str(tmp_path / "bad.png")})
    assert batch_key_of(bad) == batch_key_of(good[0])
    jobs = enqueue(broker, good[0], bad, good[2])

    assert make_worker(parts, engine, batch_max_jobs=4).run_once()

    failed = broker.get(jobs[1].id)
    assert failed.status is S.FAILED and failed.error is not None
    assert failed.error.code == "invalid_input_image"
    for job, spec in ((jobs[0], good[0]), (jobs[2], good[2])):
        done = broker.get(job.id)
        assert done.status is S.SUCCEEDED and done.result is not None
        assert done.result.batch_jobs == 1  # ran alone after the batch failed
        alone = engine.run(spec)
        assert not isinstance(alone, Cancelled)
        (image,) = stored_images(tmp_path, done)
        assert max_pixel_difference(image, alone.images[0]) <= TOLERANCE


class CancellingBroker(SqliteBroker):
    """Asks to cancel some jobs once the worker reports progress at `at_step` (the cancel
    lands mid-batch, from inside the engine's step callback)."""

    def __init__(self, path: Path, cancel: set[str], at_step: int) -> None:
        super().__init__(path)
        self.to_cancel, self.at_step = cancel, at_step

    def progress(self, job_id: str, worker_id: str, step: int, total_steps: int) -> None:
        super().progress(job_id, worker_id, step, total_steps)
        if job_id in self.to_cancel and step >= self.at_step:
            self.to_cancel.discard(job_id)
            self.cancel(job_id)


class RecordingEngine:
    """The real engine, keeping what each batched call returned."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.outcomes: list[Any] = []

    def load(self, model: str | None = None) -> object:
        return self.engine.load(model)

    def run(self, spec: JobSpec, on_step: Any = None, is_cancelled: Any = None) -> Any:
        raise AssertionError("these jobs run as one batch")

    def run_batch(self, specs: list[JobSpec], on_step: Any = None, is_cancelled: Any = None) -> Any:
        outcome = self.engine.run_batch(specs, on_step, is_cancelled)
        self.outcomes.append(outcome)
        return outcome


def test_cancelling_one_job_of_a_real_batch_leaves_the_others_intact(
    parts: Parts, engine: Engine, tmp_path: Path
) -> None:
    settings, broker, _ = parts
    specs = [fake_spec(p, seed=s, steps=8) for p, s in (("one", 5), ("two", 6), ("three", 7))]
    jobs = enqueue(broker, *specs)
    cancelling = CancellingBroker(settings.database_path, {jobs[1].id}, at_step=2)
    try:
        assert make_worker(parts, engine, broker=cancelling, batch_max_jobs=4).run_once()
    finally:
        cancelling.close()

    canceled = broker.get(jobs[1].id)
    assert canceled.status is S.CANCELED and canceled.result is None
    assert canceled.progress.step < 8
    assert broker.events(jobs[1].id)[-1].type is EventType.CANCELED
    assert not list((tmp_path / "assets").rglob(f"*{jobs[1].id}*"))  # nothing stored for it
    for index in (0, 2):
        done = broker.get(jobs[index].id)
        assert done.status is S.SUCCEEDED and done.result is not None
        assert done.result.batch_jobs == 3
        alone = engine.run(specs[index])
        assert not isinstance(alone, Cancelled)
        (image,) = stored_images(tmp_path, done)
        assert max_pixel_difference(image, alone.images[0]) <= TOLERANCE


def test_cancelling_every_job_of_a_real_batch_stops_the_engine(
    parts: Parts, engine: Engine, tmp_path: Path
) -> None:
    settings, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p, steps=30) for p in ("one", "two")))
    cancelling = CancellingBroker(settings.database_path, {job.id for job in jobs}, at_step=2)
    recording = RecordingEngine(engine)
    try:
        assert make_worker(parts, recording, broker=cancelling, batch_max_jobs=4).run_once()
    finally:
        cancelling.close()
    (outcome,) = recording.outcomes
    assert isinstance(outcome, Cancelled)  # is_cancelled was true once no job was left
    assert outcome.step <= 3 and outcome.total_steps == 30
    for job in jobs:
        stored = broker.get(job.id)
        assert stored.status is S.CANCELED
        assert stored.progress.step <= 3  # stopped at the next step, not after 30
    assert not (tmp_path / "assets").exists() or not list((tmp_path / "assets").rglob("*.png"))


# --------------------------------------------------------------------------- limits and order


def test_batch_max_jobs_limits_each_batch(parts: Parts, tmp_path: Path) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(f"p{i}", seed=100 + i) for i in range(5)))
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=2)

    assert [worker.run_once() for _ in range(3)] == [True, True, True]
    assert not worker.run_once()

    assert engine.calls == [("batch", ["p0", "p1"]), ("batch", ["p2", "p3"]), ("run", ["p4"])]
    assert batch_sizes(broker, jobs) == [2, 2, 2, 2, 1]
    assert engine.all_batches_compatible()
    for index, job in enumerate(jobs):  # each job got its own seed's image
        (image,) = stored_images(tmp_path, broker.get(job.id))
        assert image.getpixel((0, 0)) == seed_colour(100 + index)


def test_batch_max_images_limits_each_batch(parts: Parts) -> None:
    _, broker, _ = parts
    counts = [1, 2, 2, 1, 3, 6, 1]
    jobs = enqueue(broker, *(fake_spec(f"p{i}", num_images=n) for i, n in enumerate(counts)))
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=8, batch_max_images=4)

    while worker.run_once():
        assert len(engine.calls) <= len(jobs)

    assert engine.calls == [
        ("batch", ["p0", "p1"]),  # 3 images; p2's 2 would make 5
        ("batch", ["p2", "p3"]),  # 3 images; p4's 3 would make 6
        ("run", ["p4"]),  # 3 images; p5's 6 do not fit
        ("run", ["p5"]),  # 6 images: more than the cap alone, so nothing joins it
        ("run", ["p6"]),
    ]
    assert batch_sizes(broker, jobs) == [2, 2, 2, 2, 1, 1, 1]
    for job, count in zip(jobs, counts, strict=True):
        result = broker.get(job.id).result
        assert result is not None and len(result.assets) == count


def test_an_incompatible_head_stops_gathering_and_order_is_kept(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(
        broker,
        fake_spec("a"),
        fake_spec("b"),
        fake_spec("odd", steps=5),  # another batch key
        fake_spec("d"),
        fake_spec("e"),
    )
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=4)

    assert worker.run_once()
    assert engine.calls == [("batch", ["a", "b"])]
    odd = broker.get(jobs[2].id)
    assert odd.status is S.QUEUED and odd.attempts == 0 and odd.queue_position == 1
    assert [broker.get(job.id).status for job in jobs[3:]] == [S.QUEUED, S.QUEUED]

    assert worker.run_once()
    assert worker.run_once()
    assert not worker.run_once()
    assert engine.calls == [("batch", ["a", "b"]), ("run", ["odd"]), ("batch", ["d", "e"])]
    assert batch_sizes(broker, jobs) == [2, 2, 1, 2, 2]
    started = [broker.get(job.id).started_at for job in jobs]
    assert all(t is not None for t in started)
    assert started == sorted(started)  # type: ignore[type-var]


def test_a_multi_image_inpainting_job_never_joins_a_batch(parts: Parts) -> None:
    _, broker, _ = parts
    inpaint = {"image": "http://example.test/a.png", "mask": "http://example.test/m.png"}
    one, many, two, three = (
        fake_spec("one", **inpaint),
        fake_spec("many", num_images=2, **inpaint),
        fake_spec("two", **inpaint),
        fake_spec("three", **inpaint),
    )
    assert batch_key_of(many) is None
    assert batch_key_of(one) == batch_key_of(two) == batch_key_of(three) is not None
    jobs = enqueue(broker, one, many, two, three)
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=4)

    while worker.run_once():
        pass

    assert engine.calls == [
        ("run", ["one"]),  # the multi-image job at the head stops the gathering
        ("run", ["many"]),  # and runs alone: nothing joins it
        ("batch", ["two", "three"]),
    ]
    assert batch_sizes(broker, jobs) == [1, 1, 2, 2]
    assert engine.all_batches_compatible()


def test_batching_is_off_by_default(parts: Parts) -> None:
    settings, broker, _ = parts
    assert settings.batch_max_jobs == 1
    jobs = enqueue(broker, fake_spec("a"), fake_spec("b"))
    engine = BatchEngine()
    worker = make_worker(parts, engine)
    while worker.run_once():
        pass
    assert engine.calls == [("run", ["a"]), ("run", ["b"])]
    assert batch_sizes(broker, jobs) == [1, 1]


# --------------------------------------------------------------------------- gather window


def enqueue_when_running(broker: SqliteBroker, first: Job, spec: JobSpec, delay_s: float) -> Any:
    """From another thread: once `first` is claimed, wait delay_s and enqueue `spec`."""
    box: dict[str, Any] = {}

    def later() -> None:
        deadline = time.monotonic() + 10
        while broker.get(first.id).status is S.QUEUED and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay_s)
        box["job"] = broker.enqueue(spec)[0]

    thread = threading.Thread(target=later)
    thread.start()
    return thread, box


def test_a_job_arriving_within_the_window_joins_the_batch(parts: Parts) -> None:
    _, broker, _ = parts
    (first,) = enqueue(broker, fake_spec("first"))
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=4, batch_window_s=0.4)
    thread, box = enqueue_when_running(broker, first, fake_spec("late"), delay_s=0.1)
    try:
        started = time.monotonic()
        assert worker.run_once()
        elapsed = time.monotonic() - started
    finally:
        thread.join(timeout=10)

    assert engine.calls == [("batch", ["first", "late"])]
    assert batch_sizes(broker, [first, box["job"]]) == [2, 2]
    assert elapsed >= 0.35  # it waited out the window for more jobs


def test_with_no_window_a_later_job_does_not_join(parts: Parts) -> None:
    _, broker, _ = parts
    (first,) = enqueue(broker, fake_spec("first"))
    engine = BatchEngine()
    worker = make_worker(parts, engine, batch_max_jobs=4, batch_window_s=0)
    thread, box = enqueue_when_running(broker, first, fake_spec("late"), delay_s=0.1)
    try:
        assert worker.run_once()
    finally:
        thread.join(timeout=10)

    assert engine.calls == [("run", ["first"])]
    assert broker.get(box["job"].id).status is S.QUEUED
    assert worker.run_once()
    assert engine.calls == [("run", ["first"]), ("run", ["late"])]
    assert batch_sizes(broker, [first, box["job"]]) == [1, 1]


# --------------------------------------------------------------------------- cancel


def test_a_job_cancelled_mid_batch_ends_canceled_and_the_others_succeed(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p, steps=10) for p in ("a", "b", "c")))
    webhooks = RecordingWebhooks()

    def hook(step: int) -> None:
        if step == 3:
            broker.cancel(jobs[1].id)

    engine = BatchEngine(step_hook=hook)
    assert make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4).run_once()

    assert engine.calls == [("batch", ["a", "b", "c"])]
    assert engine.stopped_at == []  # the others still needed the engine
    canceled = broker.get(jobs[1].id)
    assert canceled.status is S.CANCELED and canceled.result is None
    assert canceled.progress.step == 2  # its last progress came before the cancel
    assert [e.type for e in broker.events(jobs[1].id)][-1] is EventType.CANCELED
    for job in (jobs[0], jobs[2]):
        done = broker.get(job.id)
        assert done.status is S.SUCCEEDED and done.result is not None
        assert done.result.batch_jobs == 3 and done.progress.step == 10
    assert webhooks.terminal(jobs[1].id) == [EventType.CANCELED]
    assert webhooks.terminal(jobs[0].id) == webhooks.terminal(jobs[2].id) == [EventType.COMPLETED]


def test_cancelling_every_job_of_a_batch_stops_the_engine(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p, steps=10) for p in ("a", "b", "c")))
    webhooks = RecordingWebhooks()

    def hook(step: int) -> None:
        if step == 2:
            broker.cancel(jobs[0].id)
        if step == 4:
            broker.cancel(jobs[1].id)
            broker.cancel(jobs[2].id)

    engine = BatchEngine(step_hook=hook)
    assert make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4).run_once()

    assert engine.calls == [("batch", ["a", "b", "c"])]
    assert engine.stopped_at == [(4, 10)]  # is_cancelled was true once no job was left
    assert [broker.get(job.id).status for job in jobs] == [S.CANCELED] * 3
    for job in jobs:
        assert webhooks.terminal(job.id) == [EventType.CANCELED]
    assert queued(broker) == 0 and broker.stats().running == 0


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "error",
    [ValueError("boom"), OutOfMemoryError("out of device memory for 4 image(s)")],
    ids=["ordinary", "out_of_memory"],
)
def test_a_failed_batch_runs_every_job_alone(parts: Parts, error: Exception) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p, seed=10 * i) for i, p in enumerate("abc")))
    webhooks = RecordingWebhooks()
    engine = BatchEngine(batch_error=error, fail_at_step=2)
    assert make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4).run_once()

    assert engine.calls == [
        ("batch", ["a", "b", "c"]),
        ("run", ["a"]),
        ("run", ["b"]),
        ("run", ["c"]),
    ]
    for job in jobs:
        done = broker.get(job.id)
        assert done.status is S.SUCCEEDED and done.result is not None, done.error
        assert done.result.batch_jobs == 1 and done.attempts == 1
        assert webhooks.terminal(job.id) == [EventType.COMPLETED]


def test_a_job_cancelled_before_the_batch_failed_is_not_run_again(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p) for p in "abc"))
    webhooks = RecordingWebhooks()

    def hook(step: int) -> None:
        if step == 1:
            broker.cancel(jobs[1].id)

    engine = BatchEngine(batch_error=ValueError("boom"), fail_at_step=2, step_hook=hook)
    assert make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4).run_once()

    assert engine.calls == [("batch", ["a", "b", "c"]), ("run", ["a"]), ("run", ["c"])]
    assert broker.get(jobs[1].id).status is S.CANCELED
    assert [broker.get(jobs[i].id).status for i in (0, 2)] == [S.SUCCEEDED] * 2
    assert webhooks.terminal(jobs[1].id) == [EventType.CANCELED]


def test_a_fatal_device_error_in_a_batch_leaves_every_job_to_reclaim(parts: Parts) -> None:
    """Which job broke the device is unknown, so none is failed: they stay running on the
    dying worker and reclaim re-queues them, as for a crashed worker."""
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p) for p in "abc"))
    webhooks = RecordingWebhooks()
    engine = BatchEngine(batch_error=RuntimeError("CUDA error: an illegal memory access"))
    worker = make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4)

    with pytest.raises(FatalEngineError, match="CUDA error"):
        worker.run_once()

    assert engine.calls == [("batch", ["a", "b", "c"])]  # nothing more runs on the device
    for job in jobs:
        assert broker.get(job.id).status is S.RUNNING
        assert webhooks.terminal(job.id) == []
    assert sorted(broker.reclaim(stale_after_s=3600, worker_id="w1")) == sorted(
        job.id for job in jobs
    )
    assert all(broker.get(job.id).status is S.QUEUED for job in jobs)


class FailingStorage(LocalStorage):
    """Local storage that refuses every write of one job."""

    def __init__(self, root: Path, failing_job: str) -> None:
        super().__init__(root, "http://test")
        self.failing_job = failing_job

    def put(self, key: str, data: bytes, content_type: str) -> str:
        if self.failing_job in key:
            raise OSError("disk full")
        return super().put(key, data, content_type)


def test_one_jobs_storage_failure_fails_only_that_job(parts: Parts) -> None:
    settings, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p) for p in "abc"))
    webhooks = RecordingWebhooks()
    engine = BatchEngine()
    storage = FailingStorage(settings.assets_dir, jobs[1].id)
    worker = make_worker(parts, engine, storage=storage, webhooks=webhooks, batch_max_jobs=4)
    assert worker.run_once()

    assert engine.calls == [("batch", ["a", "b", "c"])]  # not run again alone
    failed = broker.get(jobs[1].id)
    assert failed.status is S.FAILED and failed.error is not None
    assert failed.error.code == "internal_error" and "disk full" in failed.error.message
    assert [broker.get(jobs[i].id).status for i in (0, 2)] == [S.SUCCEEDED] * 2
    assert webhooks.terminal(jobs[1].id) == [EventType.FAILED]
    assert webhooks.terminal(jobs[0].id) == [EventType.COMPLETED]


def test_a_job_cancelled_before_a_fatal_error_gets_one_webhook(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p) for p in "abc"))
    webhooks = RecordingWebhooks()

    def hook(step: int) -> None:
        if step == 1:
            broker.cancel(jobs[1].id)

    engine = BatchEngine(
        batch_error=RuntimeError("CUDA error: device lost"), fail_at_step=2, step_hook=hook
    )
    worker = make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4)
    with pytest.raises(FatalEngineError):
        worker.run_once()

    assert broker.get(jobs[1].id).status is S.CANCELED
    assert [broker.get(jobs[i].id).status for i in (0, 2)] == [S.RUNNING] * 2
    assert webhooks.terminal(jobs[1].id) == [EventType.CANCELED]


# --------------------------------------------------------------------------- progress, webhooks


def test_progress_and_webhooks_for_every_job_of_a_batch(parts: Parts) -> None:
    _, broker, _ = parts
    hook_url = "http://hooks.example.test/x"
    jobs = enqueue(
        broker,
        fake_spec("a", steps=5),
        fake_spec("b", steps=5, webhook=hook_url, webhook_progress=True),
        fake_spec("c", steps=5),
    )
    webhooks = RecordingWebhooks()
    engine = BatchEngine()
    assert make_worker(parts, engine, webhooks=webhooks, batch_max_jobs=4).run_once()

    assert engine.calls == [("batch", ["a", "b", "c"])]
    for job in jobs:
        events = broker.events(job.id)
        steps = [e.data["step"] for e in events if e.type is EventType.PROGRESS]
        assert steps == [1, 2, 3, 4, 5], job.spec.prompt
        assert [e.type for e in events][-1] is EventType.COMPLETED
        assert broker.get(job.id).progress.step == 5
        assert webhooks.terminal(job.id) == [EventType.COMPLETED]  # once per job
    progress_hooks = [(i, step) for i, e, step in webhooks.sent if e is EventType.PROGRESS]
    assert progress_hooks == [(jobs[1].id, step) for step in (1, 2, 3, 4)]  # not the last


def test_progress_is_throttled_across_the_batch(parts: Parts) -> None:
    _, broker, _ = parts
    jobs = enqueue(broker, *(fake_spec(p, steps=40) for p in "ab"))
    engine = BatchEngine(step_s=0.005)
    worker = make_worker(parts, engine, batch_max_jobs=4, progress_interval_s=0.05)
    assert worker.run_once()
    per_job = [
        [e.data["step"] for e in broker.events(job.id) if e.type is EventType.PROGRESS]
        for job in jobs
    ]
    assert per_job[0] == per_job[1]  # sent together, for every job of the batch
    assert 1 < len(per_job[0]) < 40 and per_job[0][-1] == 40


# --------------------------------------------------------------------------- Redis


def test_a_batch_on_redis_completes_and_its_heartbeats_keep_every_job(
    redis_server: Any, tmp_path: Path
) -> None:
    """Three compatible jobs are claimed into one batch; while it runs, the worker's
    heartbeats (every 0.1 s) keep all three alive, so a reclaim with a 0.3 s timeout
    taken 0.6 s into the batch (no progress sent meanwhile) takes none of them."""
    from sdworker.broker.redis import RedisBroker

    prefix = f"test-{uuid.uuid4().hex}"
    broker = RedisBroker(redis_server.url, prefix=prefix)
    observer = RedisBroker(redis_server.url, prefix=prefix)
    settings = Settings(
        _env_file=None, data_dir=tmp_path, progress_interval_s=0, heartbeat_interval_s=0.1,
        poll_interval_s=0.02, batch_max_jobs=4,
    )  # fmt: skip
    seen: dict[str, Any] = {}

    def mid_batch() -> None:
        time.sleep(0.6)
        seen["workers"] = observer.workers()
        seen["reclaimed"] = observer.reclaim(stale_after_s=0.3)

    engine = BatchEngine(before_steps=mid_batch)
    worker = Worker(
        settings, broker, LocalStorage(settings.assets_dir, "http://test"), engine, "w1"
    )
    thread = None
    try:
        jobs = enqueue(broker, *(fake_spec(p, seed=i) for i, p in enumerate("abc")))
        thread = threading.Thread(target=worker.run_forever, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if all(observer.get(job.id).status.is_terminal() for job in jobs):
                break
            time.sleep(0.02)
        worker.stop()
        thread.join(timeout=10)
        assert not thread.is_alive()

        assert engine.calls == [("batch", ["a", "b", "c"])]
        assert seen["reclaimed"] == []
        (info,) = seen["workers"]
        assert set(info.jobs_held()) == {job.id for job in jobs}
        for job in jobs:
            done = observer.get(job.id)
            assert done.status is S.SUCCEEDED and done.result is not None
            assert done.result.batch_jobs == 3 and done.attempts == 1
            assert EventType.QUEUED not in [e.type for e in observer.events(job.id)][1:]
    finally:
        worker.stop()
        if thread is not None:
            thread.join(timeout=10)
        broker.close()
        observer.close()
