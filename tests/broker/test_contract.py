"""The Broker contract (src/sdworker/broker/base.py), run against every backend.

Each test gets a fresh, empty broker from the `broker` fixture (tests/broker/conftest.py),
parametrized over the backends. No engine, no torch: plain JobSpecs and hand-made results.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise

import pytest

from sdworker.broker.base import DURATION_BUCKETS_S, Broker, WorkerInfo
from sdworker.errors import JobConflictError, JobNotFoundError
from sdworker.jobs import (
    ANONYMOUS_OWNER,
    Asset,
    EventType,
    Job,
    JobError,
    JobEvent,
    JobResult,
    JobSpec,
    JobStatus,
    JobTimings,
    Priority,
    owner_of,
)
from tests.broker.conftest import BrokerHandle

E = EventType
S = JobStatus


# --------------------------------------------------------------------------- helpers


def make_spec(prompt: str = "a red fox in snow", **kwargs: object) -> JobSpec:
    return JobSpec(prompt=prompt, **kwargs)  # type: ignore[arg-type]


def make_result(total_s: float = 1.5, images: int = 2) -> JobResult:
    assets = [
        Asset(
            key=f"anonymous/job/{i}.png",
            url=f"http://assets.test/anonymous/job/{i}.png",
            thumbnail_key=f"anonymous/job/{i}.thumb.webp",
            thumbnail_url=f"http://assets.test/anonymous/job/{i}.thumb.webp",
            content_type="image/png",
            metadata={"seed": 100 + i},
        )
        for i in range(images)
    ]
    return JobResult(
        assets=assets,
        seeds=[100 + i for i in range(images)],
        model="tiny-sdxl",
        device="cpu",
        timings=JobTimings(inference_s=total_s / 2, total_s=total_s),
        warnings=["a warning"],
    )


def event_types(broker: Broker, job_id: str) -> list[EventType]:
    return [event.type for event in broker.events(job_id)]


def events_of(broker: Broker, job_id: str, kind: EventType) -> list[JobEvent]:
    return [event for event in broker.events(job_id) if event.type == kind]


def enqueue(broker: Broker, spec: JobSpec | None = None, **kwargs: object) -> Job:
    job, created = broker.enqueue(spec or make_spec(**kwargs))
    assert created
    return job


def start(broker: Broker, worker_id: str = "w1", **kwargs: object) -> Job:
    """Enqueue one job on an otherwise idle queue and claim it."""
    job = enqueue(broker, **kwargs)
    claimed = broker.claim(worker_id)
    assert claimed is not None and claimed.id == job.id
    return claimed


def drain(broker: Broker, worker_id: str = "w1") -> list[Job]:
    claimed = []
    while (job := broker.claim(worker_id)) is not None:
        claimed.append(job)
        assert len(claimed) < 10_000, "claim never returns None"
    return claimed


def now_utc() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime) -> datetime:
    """Timestamps compared as UTC; naive ones are taken as UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- enqueue


def test_enqueue_stores_a_queued_job_and_emits_one_queued_event(broker: BrokerHandle) -> None:
    before = now_utc()
    spec = make_spec(priority=Priority.HIGH, metadata={"user_id": "alice"}, seed=7)
    job, created = broker.enqueue(spec)

    assert created is True
    assert isinstance(job.id, str) and job.id
    assert job.status == S.QUEUED
    assert job.spec == spec
    assert job.priority == Priority.HIGH
    assert job.owner == "alice"
    assert job.attempts == 0
    assert job.worker_id is None
    assert job.started_at is None and job.finished_at is None
    assert job.result is None and job.error is None
    assert job.created_at is not None
    assert abs((aware(job.created_at) - before).total_seconds()) < 60

    stored = broker.get(job.id)
    assert stored.id == job.id
    assert stored.status == S.QUEUED
    assert stored.spec == spec
    assert stored.priority == Priority.HIGH
    assert stored.owner == "alice"
    assert aware(stored.created_at) == aware(job.created_at)

    events = broker.events(job.id)
    assert [event.type for event in events] == [E.QUEUED]
    assert events[0].job_id == job.id


def test_owner_defaults_to_anonymous_and_follows_owner_of(broker: BrokerHandle) -> None:
    anonymous = enqueue(broker, make_spec())
    empty = enqueue(broker, make_spec(metadata={"user_id": ""}))
    odd_spec = make_spec(metadata={"user_id": "bob@example.com/../x"})
    odd = enqueue(broker, odd_spec)

    assert anonymous.owner == ANONYMOUS_OWNER
    assert empty.owner == ANONYMOUS_OWNER
    assert odd.owner == owner_of(odd_spec) != "bob@example.com/../x"
    assert broker.get(odd.id).owner == odd.owner


def test_priority_defaults_to_normal(broker: BrokerHandle) -> None:
    assert enqueue(broker).priority == Priority.NORMAL


def test_job_ids_are_unique_strings(broker: BrokerHandle) -> None:
    same = make_spec()
    ids = [enqueue(broker, same).id for _ in range(50)]
    assert all(isinstance(job_id, str) and job_id for job_id in ids)
    assert len(set(ids)) == 50


# --------------------------------------------------------------------------- idempotency


def test_same_idempotency_key_and_equal_spec_returns_the_earlier_job(
    broker: BrokerHandle,
) -> None:
    first, created = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")
    again, created_again = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")

    assert created is True
    assert created_again is False
    assert again.id == first.id
    assert again.spec == first.spec
    assert event_types(broker, first.id) == [E.QUEUED]
    jobs, _ = broker.list()
    assert [job.id for job in jobs] == [first.id]


def test_idempotency_key_still_answers_after_the_job_ran(broker: BrokerHandle) -> None:
    job, _ = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")
    assert broker.claim("w1") is not None
    assert broker.complete(job.id, "w1", make_result())

    again, created = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")
    assert created is False
    assert again.id == job.id
    assert again.status == S.SUCCEEDED
    assert broker.claim("w1") is None


def test_find_by_idempotency_key(broker: BrokerHandle) -> None:
    assert broker.find("key-1") is None
    job, _ = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")
    broker.enqueue(make_spec(seed=2), idempotency_key="key-2")
    broker.enqueue(make_spec(seed=3))
    found = broker.find("key-1")
    assert found is not None and found.id == job.id and found.spec.seed == 1
    assert broker.claim("w1") is not None
    assert broker.complete(job.id, "w1", make_result())
    done = broker.find("key-1")
    assert done is not None and done.status == S.SUCCEEDED
    assert broker.find("key-3") is None


def test_idempotency_compares_specs_not_their_serialization(broker: BrokerHandle) -> None:
    """Equal specs are equal whatever the key order of their metadata (a retry may come
    from another client library that orders JSON keys differently)."""
    first_spec = make_spec(metadata={"user_id": "alice", "tag": "x", "extra": {"a": 1, "b": 2}})
    again_spec = make_spec(metadata={"extra": {"b": 2, "a": 1}, "tag": "x", "user_id": "alice"})
    assert first_spec == again_spec

    first, _ = broker.enqueue(first_spec, idempotency_key="key-1")
    again, created = broker.enqueue(again_spec, idempotency_key="key-1")

    assert created is False
    assert again.id == first.id


def test_same_idempotency_key_and_different_spec_conflicts(broker: BrokerHandle) -> None:
    first, _ = broker.enqueue(make_spec(seed=1), idempotency_key="key-1")
    with pytest.raises(JobConflictError):
        broker.enqueue(make_spec(seed=2), idempotency_key="key-1")

    jobs, _ = broker.list()
    assert [job.id for job in jobs] == [first.id]
    assert event_types(broker, first.id) == [E.QUEUED]


def test_different_idempotency_keys_make_different_jobs(broker: BrokerHandle) -> None:
    a, created_a = broker.enqueue(make_spec(), idempotency_key="key-a")
    b, created_b = broker.enqueue(make_spec(), idempotency_key="key-b")
    c, created_c = broker.enqueue(make_spec())  # no key: always a new job
    d, created_d = broker.enqueue(make_spec())

    assert created_a and created_b and created_c and created_d
    assert len({a.id, b.id, c.id, d.id}) == 4


# --------------------------------------------------------------------------- claim


def test_claim_on_an_empty_queue_returns_none(broker: BrokerHandle) -> None:
    assert broker.claim("w1") is None


def test_claim_order_is_priority_then_fifo(broker: BrokerHandle) -> None:
    order = [Priority.LOW, Priority.NORMAL, Priority.URGENT, Priority.HIGH]
    enqueued: list[Job] = []
    for i in range(24):  # interleaved: low, normal, urgent, high, low, ...
        priority = order[i % 4]
        enqueued.append(enqueue(broker, make_spec(prompt=f"job {i}", priority=priority)))

    claimed = drain(broker)

    expected = sorted(enqueued, key=lambda job: -job.priority.rank)  # stable: FIFO kept
    assert [job.id for job in claimed] == [job.id for job in expected]
    assert [job.priority for job in claimed] == [job.priority for job in expected]


def test_a_claimed_job_is_running_on_the_worker(broker: BrokerHandle) -> None:
    job = enqueue(broker)
    claimed = broker.claim("worker-a")

    assert claimed is not None
    assert claimed.id == job.id
    assert claimed.status == S.RUNNING
    assert claimed.worker_id == "worker-a"
    assert claimed.attempts == 1
    assert claimed.started_at is not None
    assert aware(claimed.started_at) >= aware(job.created_at)
    assert claimed.queue_position is None

    stored = broker.get(job.id)
    assert stored.status == S.RUNNING
    assert stored.worker_id == "worker-a"
    assert stored.attempts == 1
    assert stored.started_at is not None

    assert event_types(broker, job.id) == [E.QUEUED, E.STARTED]


def test_a_job_is_never_claimed_twice(broker: BrokerHandle) -> None:
    ids = {enqueue(broker, make_spec(prompt=f"job {i}")).id for i in range(10)}
    first = drain(broker, "w1")
    assert {job.id for job in first} == ids
    assert len(first) == 10
    assert broker.claim("w2") is None


def _claim_concurrently(brokers: list[Broker]) -> dict[str, list[str]]:
    """Each broker (one per thread) claims in a loop until the queue is empty."""
    barrier = threading.Barrier(len(brokers))
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def loop(worker_id: str, broker: Broker) -> None:
        mine: list[str] = []
        claimed[worker_id] = mine
        try:
            barrier.wait(timeout=10)
            while (job := broker.claim(worker_id)) is not None:
                assert job.worker_id == worker_id
                mine.append(job.id)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=(f"w{i}", b), daemon=True) for i, b in enumerate(brokers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a claimer hung"
    assert not errors, f"claimers raised: {errors!r}"
    return claimed


@pytest.mark.parametrize("shared_instance", [True, False], ids=["one-instance", "instances"])
def test_concurrent_claimers_claim_every_job_exactly_once(
    broker: BrokerHandle, shared_instance: bool
) -> None:
    count = 200
    ids = [enqueue(broker, make_spec(prompt=f"job {i}")).id for i in range(count)]
    brokers: list[Broker] = (
        [broker.current] * 4 if shared_instance else [broker.open_another() for _ in range(4)]
    )

    claimed = _claim_concurrently(brokers)

    everything = [job_id for mine in claimed.values() for job_id in mine]
    duplicates = [job_id for job_id, n in Counter(everything).items() if n > 1]
    assert not duplicates, f"claimed more than once: {duplicates[:5]}"
    assert sorted(everything) == sorted(ids)
    for worker_id, mine in claimed.items():
        for job_id in mine[:5]:
            job = broker.get(job_id)
            assert (job.status, job.worker_id, job.attempts) == (S.RUNNING, worker_id, 1)
    assert broker.stats().running == count
    assert all(len(events_of(broker, job_id, E.STARTED)) == 1 for job_id in ids[:20])


def test_close_releases_connections_used_by_other_threads(broker: BrokerHandle) -> None:
    """A broker shared by a thread pool (API handlers, worker threads) is closed by the
    thread that made it, after the others are done with it."""
    instance = broker.open_another(close_at_teardown=False)
    enqueue(instance)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            instance.get(enqueue(instance).id)
            instance.claim("w-thread")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=use, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not errors, errors
    instance.close()  # must not raise


# --------------------------------------------------------------------------- progress


def test_progress_updates_the_job_and_emits_progress_events(broker: BrokerHandle) -> None:
    job = start(broker)
    broker.progress(job.id, "w1", 1, 8)
    broker.progress(job.id, "w1", 3, 8)

    stored = broker.get(job.id)
    assert (stored.progress.step, stored.progress.total_steps) == (3, 8)
    assert stored.progress.percent == 37.5

    progress = events_of(broker, job.id, E.PROGRESS)
    assert len(progress) == 2
    for event, (step, percent) in zip(progress, [(1, 12.5), (3, 37.5)], strict=True):
        assert event.data["step"] == step
        assert event.data["total_steps"] == 8
        assert event.data["percent"] == pytest.approx(percent)


def test_progress_by_a_worker_that_does_not_hold_the_job_records_nothing(
    broker: BrokerHandle,
) -> None:
    job = start(broker, "w1")
    broker.progress(job.id, "w1", 2, 10)
    with contextlib.suppress(JobConflictError, JobNotFoundError):
        broker.progress(job.id, "intruder", 9, 10)  # refusing loudly is fine; recording is not

    stored = broker.get(job.id)
    assert (stored.progress.step, stored.progress.total_steps) == (2, 10)
    assert len(events_of(broker, job.id, E.PROGRESS)) == 1


# --------------------------------------------------------------------------- complete


def test_complete_stores_the_result_and_emits_completed(broker: BrokerHandle) -> None:
    job = start(broker)
    result = make_result()

    assert broker.complete(job.id, "w1", result) is True

    stored = broker.get(job.id)
    assert stored.status == S.SUCCEEDED
    assert stored.result == result
    assert stored.error is None
    assert stored.finished_at is not None
    assert stored.started_at is not None
    assert aware(stored.finished_at) >= aware(stored.started_at)
    assert stored.queue_position is None

    completed = events_of(broker, job.id, E.COMPLETED)
    assert len(completed) == 1
    assets = [Asset.model_validate(asset) for asset in completed[0].data["assets"]]
    assert assets == result.assets
    assert broker.claim("w1") is None


def test_complete_by_a_worker_that_does_not_hold_the_job_changes_nothing(
    broker: BrokerHandle,
) -> None:
    job = start(broker, "w1")

    assert broker.complete(job.id, "w2", make_result()) is False

    stored = broker.get(job.id)
    assert stored.status == S.RUNNING
    assert stored.worker_id == "w1"
    assert stored.result is None
    assert stored.finished_at is None
    assert E.COMPLETED not in event_types(broker, job.id)


def test_complete_of_a_queued_job_is_refused(broker: BrokerHandle) -> None:
    job = enqueue(broker)
    assert broker.complete(job.id, "w1", make_result()) is False
    assert broker.get(job.id).status == S.QUEUED
    assert event_types(broker, job.id) == [E.QUEUED]


def test_complete_twice_only_completes_once(broker: BrokerHandle) -> None:
    job = start(broker)
    first = make_result(total_s=1.0)
    assert broker.complete(job.id, "w1", first) is True
    assert broker.complete(job.id, "w1", make_result(total_s=9.0, images=1)) is False

    stored = broker.get(job.id)
    assert stored.status == S.SUCCEEDED
    assert stored.result == first
    assert len(events_of(broker, job.id, E.COMPLETED)) == 1
    assert broker.stats().duration_count == 1


# --------------------------------------------------------------------------- fail


def test_non_retryable_failure_fails_the_job(broker: BrokerHandle) -> None:
    job = start(broker)
    error = JobError(code="invalid_input_image", message="cannot read the init image")

    assert broker.fail(job.id, "w1", error) is True

    stored = broker.get(job.id)
    assert stored.status == S.FAILED
    assert stored.error == error
    assert stored.result is None
    assert stored.finished_at is not None
    failed = events_of(broker, job.id, E.FAILED)
    assert len(failed) == 1
    assert failed[0].data["code"] == "invalid_input_image"
    assert failed[0].data["message"] == "cannot read the init image"
    assert event_types(broker, job.id) == [E.QUEUED, E.STARTED, E.FAILED]
    assert broker.claim("w1") is None


def test_retryable_failure_with_attempts_left_requeues(broker: BrokerHandle) -> None:
    assert broker.max_attempts == 3
    job = enqueue(broker)
    error = JobError(code="out_of_memory", message="CUDA out of memory")

    for attempt in (1, 2):
        claimed = broker.claim(f"w{attempt}")
        assert claimed is not None and claimed.id == job.id
        assert claimed.attempts == attempt
        assert broker.fail(job.id, f"w{attempt}", error, retryable=True) is True
        requeued = broker.get(job.id)
        assert requeued.status == S.QUEUED
        assert requeued.finished_at is None
        assert requeued.queue_position == 1

    last = broker.claim("w3")
    assert last is not None and last.id == job.id
    assert last.attempts == 3
    assert broker.fail(job.id, "w3", error, retryable=True) is True

    stored = broker.get(job.id)
    assert stored.status == S.FAILED
    assert stored.error == error
    assert stored.attempts == 3
    assert stored.finished_at is not None
    assert broker.claim("w4") is None
    assert event_types(broker, job.id) == [
        E.QUEUED,
        E.STARTED,
        E.QUEUED,
        E.STARTED,
        E.QUEUED,
        E.STARTED,
        E.FAILED,
    ]


def test_fail_by_a_worker_that_does_not_hold_the_job_changes_nothing(
    broker: BrokerHandle,
) -> None:
    job = start(broker, "w1")
    error = JobError(code="boom", message="boom")

    assert broker.fail(job.id, "w2", error) is False
    assert broker.fail(job.id, "w2", error, retryable=True) is False

    stored = broker.get(job.id)
    assert (stored.status, stored.worker_id, stored.error) == (S.RUNNING, "w1", None)
    assert event_types(broker, job.id) == [E.QUEUED, E.STARTED]


# --------------------------------------------------------------------------- cancel


def test_cancel_of_a_queued_job_cancels_it_at_once(broker: BrokerHandle) -> None:
    job = enqueue(broker)

    canceled = broker.cancel(job.id)

    assert canceled.id == job.id
    assert canceled.status == S.CANCELED
    stored = broker.get(job.id)
    assert stored.status == S.CANCELED
    assert stored.queue_position is None
    assert event_types(broker, job.id) == [E.QUEUED, E.CANCELED]
    assert broker.claim("w1") is None
    assert broker.get(job.id).attempts == 0


def test_cancel_of_a_running_job_flags_it_until_the_worker_stops(broker: BrokerHandle) -> None:
    job = start(broker, "w1")
    assert broker.cancel_requested(job.id) is False

    flagged = broker.cancel(job.id)

    assert flagged.status == S.RUNNING
    assert broker.get(job.id).status == S.RUNNING
    assert broker.get(job.id).worker_id == "w1"
    assert broker.cancel_requested(job.id) is True
    assert E.CANCELED not in event_types(broker, job.id)

    assert broker.mark_canceled(job.id, "w2") is False  # not its job
    assert broker.get(job.id).status == S.RUNNING

    assert broker.mark_canceled(job.id, "w1") is True
    assert broker.get(job.id).status == S.CANCELED
    assert event_types(broker, job.id) == [E.QUEUED, E.STARTED, E.CANCELED]
    assert broker.complete(job.id, "w1", make_result()) is False
    assert broker.get(job.id).status == S.CANCELED


def test_a_canceled_job_whose_worker_is_lost_does_not_run_again(broker: BrokerHandle) -> None:
    """Inferred from "a queued job is canceled at once and never runs": once a cancel was
    asked for, losing the worker must not hand the job to another worker."""
    job = start(broker, "w1")
    broker.cancel(job.id)

    broker.reclaim(stale_after_s=3600, worker_id="w1")

    assert broker.claim("w2") is None
    assert broker.get(job.id).status == S.CANCELED
    assert event_types(broker, job.id)[-1] == E.CANCELED


def test_a_canceled_job_that_fails_retryably_does_not_run_again(broker: BrokerHandle) -> None:
    """Same inference: a retryable failure must not requeue a job that was asked to stop."""
    job = start(broker, "w1")
    broker.cancel(job.id)

    assert broker.fail(job.id, "w1", JobError(code="out_of_memory", message="oom"), retryable=True)

    assert broker.claim("w2") is None
    assert broker.get(job.id).status.is_terminal()
    assert event_types(broker, job.id)[-1].is_terminal()


def test_other_jobs_are_not_flagged_by_a_cancel(broker: BrokerHandle) -> None:
    a = start(broker, "w1")
    b = start(broker, "w2")
    broker.cancel(a.id)
    assert broker.cancel_requested(a.id) is True
    assert broker.cancel_requested(b.id) is False


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "canceled"])
def test_cancel_of_a_finished_job_leaves_it_unchanged(broker: BrokerHandle, outcome: str) -> None:
    if outcome == "canceled":
        job = enqueue(broker)
        broker.cancel(job.id)
    else:
        job = start(broker)
        if outcome == "succeeded":
            assert broker.complete(job.id, "w1", make_result())
        else:
            assert broker.fail(job.id, "w1", JobError(code="boom", message="boom"))
    before = broker.get(job.id)
    events_before = broker.events(job.id)

    returned = broker.cancel(job.id)

    after = broker.get(job.id)
    assert returned.status == before.status == after.status == JobStatus(outcome)
    assert after.result == before.result
    assert after.error == before.error
    assert after.finished_at == before.finished_at
    assert broker.events(job.id) == events_before


def test_terminal_jobs_have_finished_at(broker: BrokerHandle) -> None:
    queued = enqueue(broker)
    broker.cancel(queued.id)
    running = start(broker)
    broker.cancel(running.id)
    assert broker.mark_canceled(running.id, "w1")
    for job_id in (queued.id, running.id):
        job = broker.get(job_id)
        assert job.status.is_terminal()
        assert job.finished_at is not None


# --------------------------------------------------------------------------- get / position


def test_get_of_an_unknown_job_raises_not_found(broker: BrokerHandle) -> None:
    with pytest.raises(JobNotFoundError):
        broker.get("no-such-job")


def test_queue_position_counts_priority_and_clears_once_running(broker: BrokerHandle) -> None:
    low = enqueue(broker, priority=Priority.LOW)
    normal_1 = enqueue(broker, priority=Priority.NORMAL)
    urgent = enqueue(broker, priority=Priority.URGENT)
    normal_2 = enqueue(broker, priority=Priority.NORMAL)

    def positions() -> list[int | None]:
        return [broker.get(job.id).queue_position for job in (urgent, normal_1, normal_2, low)]

    assert positions() == [1, 2, 3, 4]

    claimed = broker.claim("w1")
    assert claimed is not None and claimed.id == urgent.id
    assert positions() == [None, 1, 2, 3]

    broker.cancel(normal_1.id)
    assert positions() == [None, None, 1, 2]

    high = enqueue(broker, priority=Priority.HIGH)
    assert broker.get(high.id).queue_position == 1
    assert positions() == [None, None, 2, 3]


# --------------------------------------------------------------------------- list


def test_list_is_newest_first(broker: BrokerHandle) -> None:
    ids = [enqueue(broker, make_spec(prompt=f"job {i}")).id for i in range(6)]
    jobs, cursor = broker.list()
    assert [job.id for job in jobs] == ids[::-1]
    assert cursor is None


def test_list_filters_by_status_and_owner(broker: BrokerHandle) -> None:
    alice = {"user_id": "alice"}
    bob = {"user_id": "bob"}
    a_done = enqueue(broker, make_spec(prompt="a1", metadata=alice))
    assert broker.claim("w1") is not None
    assert broker.complete(a_done.id, "w1", make_result())
    a_running = enqueue(broker, make_spec(prompt="a2", metadata=alice))
    assert broker.claim("w1") is not None
    a_queued = enqueue(broker, make_spec(prompt="a3", metadata=alice))
    b_queued = enqueue(broker, make_spec(prompt="b1", metadata=bob))
    anon = enqueue(broker, make_spec(prompt="anon"))

    def ids(**filters: object) -> list[str]:
        jobs, _ = broker.list(**filters)  # type: ignore[arg-type]
        return [job.id for job in jobs]

    assert ids(status=S.QUEUED) == [anon.id, b_queued.id, a_queued.id]
    assert ids(status=S.RUNNING) == [a_running.id]
    assert ids(status=S.SUCCEEDED) == [a_done.id]
    assert ids(status=S.FAILED) == []
    assert ids(owner="alice") == [a_queued.id, a_running.id, a_done.id]
    assert ids(owner="bob") == [b_queued.id]
    assert ids(owner=ANONYMOUS_OWNER) == [anon.id]
    assert ids(owner="carol") == []
    assert ids(owner="alice", status=S.QUEUED) == [a_queued.id]
    jobs, _ = broker.list(owner="alice", status=S.RUNNING)
    assert [(job.status, job.owner) for job in jobs] == [(S.RUNNING, "alice")]


def _all_pages(broker: Broker, limit: int, **filters: object) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        jobs, cursor = broker.list(limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
        assert len(jobs) <= limit
        pages.append([job.id for job in jobs])
        if cursor is None:
            return pages
        assert len(pages) <= 100, "the cursor never runs out"


@pytest.mark.parametrize("limit", [1, 3, 7, 8, 50])
def test_list_pages_cover_every_job_exactly_once(broker: BrokerHandle, limit: int) -> None:
    ids = [
        enqueue(broker, make_spec(prompt=f"job {i}", metadata={"user_id": f"u{i % 2}"})).id
        for i in range(7)
    ]

    pages = _all_pages(broker, limit)
    assert [job_id for page in pages for job_id in page] == ids[::-1]
    assert all(len(page) == limit for page in pages[:-1])

    owned = _all_pages(broker, limit, owner="u0")
    assert [job_id for page in owned for job_id in page] == ids[::-2]


def test_list_cursor_is_stable_when_jobs_arrive_between_pages(broker: BrokerHandle) -> None:
    ids = [enqueue(broker, make_spec(prompt=f"job {i}")).id for i in range(4)]
    first, cursor = broker.list(limit=2)
    assert [job.id for job in first] == [ids[3], ids[2]]
    assert cursor is not None
    enqueue(broker, make_spec(prompt="newer"))
    second, cursor = broker.list(limit=2, cursor=cursor)
    assert [job.id for job in second] == [ids[1], ids[0]]


# --------------------------------------------------------------------------- events


def test_the_event_log_of_a_job_that_runs(broker: BrokerHandle) -> None:
    job = start(broker)
    for step in (1, 2, 3):
        broker.progress(job.id, "w1", step, 3)
    assert broker.complete(job.id, "w1", make_result())

    events = broker.events(job.id)
    assert [event.type for event in events] == [
        E.QUEUED,
        E.STARTED,
        E.PROGRESS,
        E.PROGRESS,
        E.PROGRESS,
        E.COMPLETED,
    ]
    ids = [event.id for event in events]
    assert all(a < b for a, b in pairwise(ids)), ids
    assert all(event.job_id == job.id for event in events)
    assert all(event.created_at is not None for event in events)
    assert [event.data["step"] for event in events if event.type == E.PROGRESS] == [1, 2, 3]


def test_events_after_an_id_returns_only_later_events(broker: BrokerHandle) -> None:
    job = start(broker)
    for step in range(1, 5):
        broker.progress(job.id, "w1", step, 4)
    events = broker.events(job.id)
    assert len(events) == 6

    for k, event in enumerate(events):
        assert broker.events(job.id, after_id=event.id) == events[k + 1 :]
    assert broker.events(job.id, after_id=0) == events
    assert broker.events(job.id, after_id=events[-1].id) == []

    assert broker.complete(job.id, "w1", make_result())
    later = broker.events(job.id, after_id=events[-1].id)
    assert [event.type for event in later] == [E.COMPLETED]
    assert later[0].id > events[-1].id


def test_events_belong_to_their_job(broker: BrokerHandle) -> None:
    a = enqueue(broker, make_spec(prompt="a"))
    b = enqueue(broker, make_spec(prompt="b"))
    claimed = broker.claim("w1")
    assert claimed is not None and claimed.id == a.id
    broker.progress(a.id, "w1", 1, 2)

    assert event_types(broker, a.id) == [E.QUEUED, E.STARTED, E.PROGRESS]
    assert event_types(broker, b.id) == [E.QUEUED]
    assert all(event.job_id == b.id for event in broker.events(b.id))


# --------------------------------------------------------------------------- reclaim


def test_reclaim_requeues_a_job_whose_worker_went_quiet(broker: BrokerHandle) -> None:
    job = start(broker, "w1")
    broker.heartbeat(WorkerInfo(id="w1", current_job=job.id))
    time.sleep(0.4)

    assert broker.reclaim(stale_after_s=0.2) == [job.id]

    stored = broker.get(job.id)
    assert stored.status == S.QUEUED
    assert stored.queue_position == 1
    again = broker.claim("w2")
    assert again is not None and again.id == job.id
    assert again.worker_id == "w2"
    assert again.attempts == 2


def test_reclaim_leaves_a_job_whose_worker_is_alive(broker: BrokerHandle) -> None:
    job = start(broker, "w1")
    broker.heartbeat(WorkerInfo(id="w1", current_job=job.id))
    time.sleep(0.4)
    broker.heartbeat(WorkerInfo(id="w1", current_job=job.id))  # still alive

    assert broker.reclaim(stale_after_s=0.2) == []
    assert broker.reclaim(stale_after_s=30) == []

    stored = broker.get(job.id)
    assert (stored.status, stored.worker_id, stored.attempts) == (S.RUNNING, "w1", 1)


def test_reclaim_only_takes_the_quiet_workers_jobs(broker: BrokerHandle) -> None:
    quiet = start(broker, "quiet")
    alive = start(broker, "alive")
    broker.heartbeat(WorkerInfo(id="quiet", current_job=quiet.id))
    broker.heartbeat(WorkerInfo(id="alive", current_job=alive.id))
    time.sleep(0.4)
    broker.heartbeat(WorkerInfo(id="alive", current_job=alive.id))

    assert broker.reclaim(stale_after_s=0.2) == [quiet.id]
    assert broker.get(quiet.id).status == S.QUEUED
    assert broker.get(alive.id).status == S.RUNNING


def test_reclaim_of_a_known_dead_worker_requeues_its_jobs_at_once(broker: BrokerHandle) -> None:
    dead_1 = start(broker, "dead", prompt="d1")
    dead_2 = start(broker, "dead", prompt="d2")
    other = start(broker, "other", prompt="o")
    for worker_id in ("dead", "other"):
        broker.heartbeat(WorkerInfo(id=worker_id))

    reclaimed = broker.reclaim(stale_after_s=3600, worker_id="dead")

    assert sorted(reclaimed) == sorted([dead_1.id, dead_2.id])
    assert broker.get(dead_1.id).status == S.QUEUED
    assert broker.get(dead_2.id).status == S.QUEUED
    assert broker.get(other.id).status == S.RUNNING
    assert broker.get(other.id).worker_id == "other"
    assert {job.id for job in drain(broker, "w3")} == {dead_1.id, dead_2.id}


def test_a_job_reclaimed_max_attempts_times_fails_as_worker_lost(broker: BrokerHandle) -> None:
    job = enqueue(broker)
    for attempt in range(1, broker.max_attempts + 1):
        worker_id = f"w{attempt}"
        claimed = broker.claim(worker_id)
        assert claimed is not None and claimed.id == job.id
        assert claimed.attempts == attempt
        assert broker.reclaim(stale_after_s=3600, worker_id=worker_id) == [job.id]
        expected = S.QUEUED if attempt < broker.max_attempts else S.FAILED
        assert broker.get(job.id).status == expected

    stored = broker.get(job.id)
    assert stored.error is not None
    assert stored.error.code == "worker_lost"
    assert stored.finished_at is not None
    assert broker.claim("w9") is None
    failed = events_of(broker, job.id, E.FAILED)
    assert len(failed) == 1
    assert failed[0].data["code"] == "worker_lost"
    assert broker.events(job.id)[-1].type == E.FAILED
    assert broker.stats().errors_by_code.get("worker_lost") == 1


def test_after_a_reclaim_only_the_new_holder_can_finish(broker: BrokerHandle) -> None:
    job = start(broker, "old")
    broker.heartbeat(WorkerInfo(id="old", current_job=job.id))
    time.sleep(0.4)
    assert broker.reclaim(stale_after_s=0.2) == [job.id]
    new = broker.claim("new")
    assert new is not None and new.id == job.id

    old_result = make_result(total_s=1.0, images=1)
    new_result = make_result(total_s=2.0, images=2)
    assert broker.complete(job.id, "old", old_result) is False
    assert broker.fail(job.id, "old", JobError(code="boom", message="late")) is False
    assert broker.mark_canceled(job.id, "old") is False
    assert broker.get(job.id).status == S.RUNNING

    assert broker.complete(job.id, "new", new_result) is True
    assert broker.complete(job.id, "old", old_result) is False

    stored = broker.get(job.id)
    assert stored.status == S.SUCCEEDED
    assert stored.result == new_result
    assert stored.worker_id == "new"
    assert len(events_of(broker, job.id, E.COMPLETED)) == 1


# --------------------------------------------------------------------------- heartbeat / stats


def test_heartbeat_shows_the_worker_in_stats(broker: BrokerHandle) -> None:
    before = now_utc()
    info = WorkerInfo(
        id="gpu-0",
        host="box-1",
        pid=4242,
        device="cuda:0",
        model="sdxl-base",
        model_loaded=True,
        current_job="job-1",
        vram_used_bytes=123_456,
    )
    broker.heartbeat(info)
    broker.heartbeat(WorkerInfo(id="gpu-1", host="box-2"))
    broker.heartbeat(info.model_copy(update={"current_job": None}))

    workers = {worker.id: worker for worker in broker.stats().workers}
    assert set(workers) == {"gpu-0", "gpu-1"}
    seen = workers["gpu-0"]
    assert (seen.host, seen.pid, seen.device, seen.model) == ("box-1", 4242, "cuda:0", "sdxl-base")
    assert seen.model_loaded is True
    assert seen.vram_used_bytes == 123_456
    assert seen.current_job is None  # the latest heartbeat wins
    assert seen.last_seen is not None
    assert abs((aware(seen.last_seen) - before).total_seconds()) < 60
    assert workers["gpu-1"].last_seen is not None


def test_stats_of_an_empty_broker(broker: BrokerHandle) -> None:
    stats = broker.stats()
    assert not any(stats.queued.values())
    assert stats.running == 0
    assert not any(stats.finished.values())
    assert not any(stats.errors_by_code.values())
    assert stats.duration_count == 0
    assert stats.duration_sum_s == 0
    assert not any(stats.duration_buckets.values())
    assert stats.workers == []


def test_stats_counts_queue_running_finished_errors_and_durations(broker: BrokerHandle) -> None:
    durations = [0.3, 2.0, 7.0]
    for total_s in durations:
        job = start(broker)
        assert broker.complete(job.id, "w1", make_result(total_s=total_s))
    for code in ("out_of_memory", "out_of_memory", "invalid_input_image"):
        job = start(broker)
        assert broker.fail(job.id, "w1", JobError(code=code, message=code))
    broker.cancel(enqueue(broker).id)
    start(broker, "w2")  # stays running
    for priority, n in ((Priority.URGENT, 2), (Priority.HIGH, 1), (Priority.LOW, 3)):
        for _ in range(n):
            enqueue(broker, priority=priority)

    stats = broker.stats()

    def nonzero(counts: dict[str, int]) -> dict[str, int]:
        return {key: value for key, value in counts.items() if value}

    assert nonzero(stats.queued) == {"urgent": 2, "high": 1, "low": 3}
    assert stats.queued.get("normal", 0) == 0
    assert stats.running == 1
    assert nonzero(stats.finished) == {"succeeded": 3, "failed": 3, "canceled": 1}
    assert nonzero(stats.errors_by_code) == {"out_of_memory": 2, "invalid_input_image": 1}
    assert stats.duration_count == 3
    assert stats.duration_sum_s == pytest.approx(sum(durations))

    buckets = {float(bound): count for bound, count in stats.duration_buckets.items()}
    for bound in DURATION_BUCKETS_S:
        assert bound in buckets, f"no bucket for {bound}"
        assert buckets[bound] == sum(1 for d in durations if d <= bound), bound
    if float("inf") in buckets:
        assert buckets[float("inf")] == len(durations)
    counts = [buckets[bound] for bound in sorted(buckets)]
    assert counts == sorted(counts)  # cumulative


def test_retryable_requeue_is_not_counted_as_finished(broker: BrokerHandle) -> None:
    job = start(broker)
    assert broker.fail(job.id, "w1", JobError(code="out_of_memory", message="oom"), retryable=True)
    stats = broker.stats()
    assert not any(stats.finished.values())
    assert stats.queued.get("normal") == 1
    assert stats.running == 0


# --------------------------------------------------------------------------- durability


def test_jobs_survive_a_reopen(broker: BrokerHandle) -> None:
    done = start(broker, prompt="done")
    assert broker.complete(done.id, "w1", make_result())
    spec = make_spec(seed=5, priority=Priority.HIGH, metadata={"user_id": "alice"})
    job, _ = broker.enqueue(spec, idempotency_key="durable")
    events_before = broker.events(job.id)

    reopened = broker.reopen()

    stored = reopened.get(job.id)
    assert (stored.status, stored.spec, stored.priority, stored.owner) == (
        S.QUEUED,
        spec,
        Priority.HIGH,
        "alice",
    )
    assert reopened.get(done.id).result == make_result()
    assert reopened.events(job.id) == events_before
    again, created = reopened.enqueue(spec, idempotency_key="durable")
    assert (again.id, created) == (job.id, False)

    claimed = reopened.claim("w2")
    assert claimed is not None and claimed.id == job.id
    assert claimed.attempts == 1
    events = reopened.events(job.id)
    assert [event.type for event in events] == [E.QUEUED, E.STARTED]
    assert events[1].id > events[0].id
    assert reopened.claim("w2") is None


def test_two_instances_on_one_storage_share_the_queue(broker: BrokerHandle) -> None:
    api = broker.current
    worker = broker.open_another()
    job = enqueue(api)

    claimed = worker.claim("w1")
    assert claimed is not None and claimed.id == job.id
    assert api.get(job.id).status == S.RUNNING
    api.cancel(job.id)
    assert worker.cancel_requested(job.id) is True
    assert worker.mark_canceled(job.id, "w1") is True
    assert api.get(job.id).status == S.CANCELED
    assert [event.type for event in api.events(job.id)] == [E.QUEUED, E.STARTED, E.CANCELED]


def test_webhook_attempts_are_kept_on_the_job_in_order(broker: BrokerHandle) -> None:
    from datetime import UTC, datetime

    from sdworker.jobs import WebhookAttempt

    job, _ = broker.enqueue(make_spec())
    for number, status in ((1, 500), (2, 200)):
        broker.record_webhook_attempt(
            job.id,
            WebhookAttempt(
                event="completed", attempt=number, message_id=f"{job.id}.completed",
                at=datetime.now(UTC), status_code=status, delivered=status == 200,
            ),
        )  # fmt: skip
    attempts = broker.get(job.id).webhook_attempts
    assert [(a.attempt, a.status_code, a.delivered) for a in attempts] == [
        (1, 500, False),
        (2, 200, True),
    ]
    with pytest.raises(JobNotFoundError):
        broker.record_webhook_attempt("01NOSUCHJOB", attempts[0])


def test_wait_for_events_returns_at_once_blocks_for_new_ones_and_times_out(
    broker: BrokerHandle,
) -> None:
    import threading
    import time

    job, _ = broker.enqueue(make_spec())
    (queued,) = broker.wait_for_events(job.id, 0, timeout_s=5)
    assert queued.type is E.QUEUED

    started = time.monotonic()
    assert broker.wait_for_events(job.id, queued.id, timeout_s=0.3) == []
    assert 0.25 <= time.monotonic() - started < 2

    other = broker.open_another()
    timer = threading.Timer(0.3, lambda: other.claim("w1"))
    timer.start()
    try:
        started = time.monotonic()
        events = broker.wait_for_events(job.id, queued.id, timeout_s=5)
        waited = time.monotonic() - started
    finally:
        timer.join()
    assert [e.type for e in events] == [E.STARTED]
    assert 0.2 <= waited < 3


def test_a_heartbeat_keeps_only_the_job_the_worker_says_it_holds(broker: BrokerHandle) -> None:
    """A claim whose reply the worker never got (a broker blip) must not be kept alive by
    the worker's heartbeats: it goes stale and is reclaimed."""
    import time

    orphan = start(broker, "w1", prompt="orphan")
    held = start(broker, "w1", prompt="held")
    time.sleep(0.3)
    broker.heartbeat(WorkerInfo(id="w1", current_job=held.id))

    reclaimed = broker.reclaim(stale_after_s=0.2)

    assert reclaimed == [orphan.id]
    assert broker.get(orphan.id).status == S.QUEUED
    assert broker.get(held.id).status == S.RUNNING


def test_workers_lists_the_registry_cheaply(broker: BrokerHandle) -> None:
    broker.heartbeat(WorkerInfo(id="b", device="cuda:1"))
    broker.heartbeat(WorkerInfo(id="a", device="cuda:0"))
    workers = broker.workers()
    assert [(w.id, w.device) for w in workers] == [("a", "cuda:0"), ("b", "cuda:1")]
    assert all(w.last_seen is not None for w in workers)
    assert workers == broker.stats().workers


def test_a_cursor_past_every_job_lists_from_the_newest(broker: BrokerHandle) -> None:
    """Cursors are opaque to callers: one beyond any integer a backend stores (the API
    accepts 32 digits) is no 5xx, it just starts at the newest job."""
    for i in range(3):
        enqueue(broker, make_spec(prompt=f"job {i}"))
    newest, _ = broker.list()
    jobs, _ = broker.list(cursor="9" * 32)
    assert [job.id for job in jobs] == [job.id for job in newest]
