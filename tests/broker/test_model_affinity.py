"""Model affinity in the Broker contract: `claim(..., prefer_models=..., affinity_wait_s=...)`.

A worker names the models it has loaded. When the head of the queue (highest priority,
then oldest) is for another model and has waited less than affinity_wait_s, the claim
takes the oldest job of the head's priority for a loaded model instead; a head that has
waited affinity_wait_s is taken by the next claim, and a lower priority never jumps a
higher one. A job taken that way lives through heartbeats, progress, completion,
retries, cancels and reclaims exactly like a head-claimed one. Every test runs on each
backend through the `broker` fixture (tests/broker/conftest.py); a few look inside one.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sdworker.broker.base import Broker, WorkerInfo
from sdworker.broker.records import model_key, spec_digest
from sdworker.jobs import (
    EventType,
    Job,
    JobError,
    JobResult,
    JobSpec,
    JobStatus,
    JobTimings,
    Priority,
    batch_key_of,
    owner_of,
)
from tests.broker.conftest import MAX_ATTEMPTS, BrokerHandle
from tests.broker.test_batch_claim import OLD_JOB_ID, make_old_database

S = JobStatus
E = EventType

A, B = "model-a", "model-b"
LONG_WAIT_S = 3600.0  # a head never waits this long in a test: the preference holds


# --------------------------------------------------------------------------- helpers


def enqueue(
    broker: Broker, model: str | None, prompt: str = "a fox", priority: Priority | None = None
) -> Job:
    fields: dict[str, object] = {"prompt": prompt, "model": model}
    if priority is not None:
        fields["priority"] = priority
    job, created = broker.enqueue(JobSpec(**fields))
    assert created
    return job


def prefer(broker: Broker, worker_id: str, *models: str, wait_s: float = LONG_WAIT_S) -> Job | None:
    return broker.claim(worker_id, prefer_models=set(models), affinity_wait_s=wait_s)


def claimed_id(job: Job | None) -> str | None:
    return None if job is None else job.id


def event_types(broker: Broker, job_id: str) -> list[EventType]:
    return [event.type for event in broker.events(job_id)]


def result() -> JobResult:
    return JobResult(assets=[], seeds=[1], model=B, device="cpu", timings=JobTimings(total_s=1.0))


def claim_behind_the_head(broker: Broker, worker_id: str = "w1") -> tuple[Job, Job]:
    """(head, moved): a queued head for model A and a job for model B behind it, taken by
    a worker that has B loaded: the job delivered through the affinity path."""
    head = enqueue(broker, A, "head")
    behind = enqueue(broker, B, "behind")
    moved = prefer(broker, worker_id, B)
    assert moved is not None and moved.id == behind.id
    assert (moved.status, moved.worker_id, moved.attempts) == (S.RUNNING, worker_id, 1)
    return head, moved


# --------------------------------------------------------------------------- the choice


def test_the_model_key_is_the_spec_model_or_empty_for_the_default() -> None:
    assert model_key(JobSpec(prompt="x")) == ""
    assert model_key(JobSpec(prompt="x", model=A)) == A


def test_a_preferring_claim_takes_a_later_job_of_the_same_priority(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head")
    b1 = enqueue(broker, B, "b1")
    b2 = enqueue(broker, B, "b2")

    assert claimed_id(prefer(broker, "w1", B)) == b1.id  # the oldest of the loaded model
    assert event_types(broker, b1.id) == [E.QUEUED, E.STARTED]
    stored = broker.get(head.id)
    assert (stored.status, stored.attempts, stored.queue_position) == (S.QUEUED, 0, 1)
    assert broker.get(b2.id).queue_position == 2
    # Plain claims go on in queue order.
    assert claimed_id(broker.claim("w2")) == head.id
    assert claimed_id(broker.claim("w2")) == b2.id
    assert broker.claim("w2") is None


def test_a_head_for_a_loaded_model_is_taken_as_usual(broker: BrokerHandle) -> None:
    a1 = enqueue(broker, A, "a1")
    enqueue(broker, B, "b1")
    assert claimed_id(prefer(broker, "w1", A, B)) == a1.id


def test_no_preferred_models_keeps_fifo(broker: BrokerHandle) -> None:
    jobs = [enqueue(broker, model, f"job {i}") for i, model in enumerate([A, B, A, B])]
    taken = [broker.claim("w1", prefer_models=(), affinity_wait_s=LONG_WAIT_S) for _ in jobs]
    assert [claimed_id(job) for job in taken] == [job.id for job in jobs]


def test_a_zero_wait_turns_the_preference_off(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head")
    enqueue(broker, B, "behind")
    assert claimed_id(prefer(broker, "w1", B, wait_s=0.0)) == head.id


def test_without_a_job_for_a_loaded_model_the_head_is_taken(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head")
    enqueue(broker, B, "behind")
    assert claimed_id(prefer(broker, "w1", "model-c")) == head.id
    assert claimed_id(prefer(broker, "w1", "model-c")) is not None
    assert prefer(broker, "w1", "model-c") is None


def test_the_default_model_is_preferred_as_the_empty_key(broker: BrokerHandle) -> None:
    enqueue(broker, A, "head")
    default = enqueue(broker, None, "default model")
    assert claimed_id(prefer(broker, "w1", "")) == default.id


def test_a_higher_priority_job_for_another_model_still_wins(broker: BrokerHandle) -> None:
    urgent = enqueue(broker, A, "urgent", Priority.HIGH)
    normal = enqueue(broker, B, "normal")
    assert claimed_id(prefer(broker, "w1", B)) == urgent.id
    assert claimed_id(prefer(broker, "w1", B)) == normal.id


def test_a_lower_priority_job_for_a_loaded_model_never_jumps_the_head(
    broker: BrokerHandle,
) -> None:
    head = enqueue(broker, A, "normal head")
    low = enqueue(broker, B, "low", Priority.LOW)
    same = enqueue(broker, B, "normal b")
    # The same-priority B job goes first, then the head: never the low one.
    assert claimed_id(prefer(broker, "w1", B)) == same.id
    assert claimed_id(prefer(broker, "w1", B)) == head.id
    assert claimed_id(prefer(broker, "w1", B)) == low.id


def test_a_head_that_waited_affinity_wait_s_is_taken_whatever_its_model(
    broker: BrokerHandle,
) -> None:
    head = enqueue(broker, A, "head")
    behind = enqueue(broker, B, "behind")
    time.sleep(0.3)
    assert claimed_id(prefer(broker, "w1", B, wait_s=0.1)) == head.id
    assert claimed_id(prefer(broker, "w1", B, wait_s=0.1)) == behind.id


def test_a_passed_over_head_is_taken_by_the_first_claim_after_its_wait(
    broker: BrokerHandle,
) -> None:
    wait_s = 1.0
    enqueued = time.monotonic()
    head = enqueue(broker, A, "head")
    b1 = enqueue(broker, B, "b1")
    b2 = enqueue(broker, B, "b2")
    assert claimed_id(prefer(broker, "w1", B, wait_s=wait_s)) == b1.id
    assert time.monotonic() - enqueued < wait_s, "too slow to test the wait"

    time.sleep(wait_s + 0.2)
    # b2 is for the loaded model too, but the head has waited long enough.
    assert claimed_id(prefer(broker, "w1", B, wait_s=wait_s)) == head.id
    assert claimed_id(prefer(broker, "w1", B, wait_s=wait_s)) == b2.id


def test_a_requeue_starts_the_wait_again(broker: BrokerHandle) -> None:
    wait_s = 0.8
    head = enqueue(broker, A, "head")
    assert claimed_id(broker.claim("w1")) == head.id
    time.sleep(wait_s + 0.2)  # older than the wait since it was made...
    assert broker.fail(head.id, "w1", JobError(code="oom", message="again"), retryable=True)
    requeued = time.monotonic()
    behind = enqueue(broker, B, "behind")
    assert broker.get(head.id).queue_position == 1

    # ...but queued again just now: it may be passed over for another wait.
    assert claimed_id(prefer(broker, "w2", B, wait_s=wait_s)) == behind.id
    assert time.monotonic() - requeued < wait_s, "too slow to test the wait"
    assert claimed_id(prefer(broker, "w2", B, wait_s=wait_s)) == head.id


def test_canceled_jobs_are_never_preferred(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head")
    canceled = enqueue(broker, B, "canceled")
    wanted = enqueue(broker, B, "wanted")
    broker.cancel(canceled.id)
    assert claimed_id(prefer(broker, "w1", B)) == wanted.id
    assert claimed_id(prefer(broker, "w1", B)) == head.id
    assert prefer(broker, "w1", B) is None
    assert broker.get(canceled.id).status == S.CANCELED


def test_a_canceled_head_is_skipped_before_choosing(broker: BrokerHandle) -> None:
    gone = enqueue(broker, A, "canceled head")
    head = enqueue(broker, A, "head")
    behind = enqueue(broker, B, "behind")
    broker.cancel(gone.id)
    assert claimed_id(prefer(broker, "w1", B)) == behind.id
    assert claimed_id(broker.claim("w1")) == head.id
    assert broker.claim("w1") is None


def test_batch_claims_ignore_the_preference(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head")
    behind = enqueue(broker, B, "behind")
    head_key, behind_key = batch_key_of(head.spec), batch_key_of(behind.spec)
    assert head_key and behind_key and head_key != behind_key  # the model is in the key

    # Only the head joins a batch, whatever the worker prefers.
    for key, expected in ((behind_key, None), (head_key, head.id)):
        taken = broker.claim("w1", batch_key=key, prefer_models={B}, affinity_wait_s=LONG_WAIT_S)
        assert claimed_id(taken) == expected
        assert broker.get(behind.id).status == S.QUEUED


def test_stats_and_positions_after_an_affinity_claim(broker: BrokerHandle) -> None:
    head, moved = claim_behind_the_head(broker)
    last = enqueue(broker, A, "last")
    stats = broker.stats()
    assert (stats.queued["normal"], stats.running) == (2, 1)
    assert broker.get(head.id).queue_position == 1
    assert broker.get(last.id).queue_position == 2
    assert broker.get(moved.id).queue_position is None


def test_concurrent_preferring_claimers_claim_every_job_exactly_once(
    broker: BrokerHandle,
) -> None:
    ids = [enqueue(broker, (A, B, None)[i % 3], f"job {i}").id for i in range(90)]
    preferences: list[set[str]] = [{A}, {B}, {""}, set()]
    brokers = [broker.open_another() for _ in preferences]
    barrier = threading.Barrier(len(brokers))
    claimed: list[str] = []
    errors: list[BaseException] = []

    def loop(worker_id: str, instance: Broker, models: set[str]) -> None:
        try:
            barrier.wait(timeout=10)
            while (job := prefer(instance, worker_id, *models)) is not None:
                assert job.worker_id == worker_id
                claimed.append(job.id)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [
        threading.Thread(target=loop, args=(f"w{i}", instance, models), daemon=True)
        for i, (instance, models) in enumerate(zip(brokers, preferences, strict=True))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a claimer hung"
    assert not errors, f"claimers raised: {errors!r}"
    duplicates = [job_id for job_id, n in Counter(claimed).items() if n > 1]
    assert not duplicates, f"claimed more than once: {duplicates[:5]}"
    assert sorted(claimed) == sorted(ids)
    assert broker.stats().running == len(ids)


# --------------------------------------------------------------------------- a moved job's life


def test_a_moved_job_reports_progress_and_completes_once(broker: BrokerHandle) -> None:
    _, moved = claim_behind_the_head(broker)
    broker.progress(moved.id, "w1", 1, 4)
    assert broker.get(moved.id).progress.step == 1
    assert broker.complete(moved.id, "w2", result()) is False
    assert broker.complete(moved.id, "w1", result()) is True
    assert broker.complete(moved.id, "w1", result()) is False
    stored = broker.get(moved.id)
    assert (stored.status, stored.result) == (S.SUCCEEDED, result())
    assert event_types(broker, moved.id) == [E.QUEUED, E.STARTED, E.PROGRESS, E.COMPLETED]
    assert broker.stats().running == 0


def test_heartbeats_keep_a_moved_job_from_being_reclaimed(broker: BrokerHandle) -> None:
    _, moved = claim_behind_the_head(broker)
    broker.heartbeat(WorkerInfo(id="w1", current_job=moved.id))
    time.sleep(0.4)
    broker.heartbeat(WorkerInfo(id="w1", current_job=moved.id))
    assert broker.reclaim(stale_after_s=0.2) == []
    assert broker.complete(moved.id, "w1", result()) is True


def test_a_moved_job_failing_retryably_goes_back_to_its_priority(broker: BrokerHandle) -> None:
    head, moved = claim_behind_the_head(broker)
    assert claimed_id(broker.claim("w2")) == head.id  # the queue is empty now

    error = JobError(code="cuda_oom", message="out of memory")
    assert broker.fail(moved.id, "w1", error, retryable=True) is True
    stored = broker.get(moved.id)
    assert (stored.status, stored.priority, stored.queue_position) == (S.QUEUED, Priority.NORMAL, 1)
    assert broker.stats().queued["normal"] == 1

    again = broker.claim("w3")  # a plain claim: it reads only the priority streams
    assert again is not None and again.id == moved.id
    assert (again.worker_id, again.attempts) == ("w3", 2)
    assert broker.complete(moved.id, "w1", result()) is False
    assert broker.complete(moved.id, "w3", result()) is True
    assert event_types(broker, moved.id) == [
        E.QUEUED, E.STARTED, E.QUEUED, E.STARTED, E.COMPLETED,
    ]  # fmt: skip


def test_a_moved_job_can_be_moved_again_after_a_retry(broker: BrokerHandle) -> None:
    _, moved = claim_behind_the_head(broker)
    error = JobError(code="cuda_oom", message="out of memory")
    assert broker.fail(moved.id, "w1", error, retryable=True) is True
    # Still behind the same head (requeued at its place or at the back of its priority).
    again = prefer(broker, "w2", B)
    assert again is not None and (again.id, again.attempts) == (moved.id, 2)
    assert broker.complete(moved.id, "w2", result()) is True


def test_a_moved_job_fails_for_good(broker: BrokerHandle) -> None:
    _, moved = claim_behind_the_head(broker)
    error = JobError(code="bad_input", message="no")
    assert broker.fail(moved.id, "w1", error, retryable=False) is True
    stored = broker.get(moved.id)
    assert stored.status == S.FAILED and stored.error == error
    assert broker.stats().errors_by_code == {"bad_input": 1}


def test_a_moved_job_is_canceled_while_it_runs(broker: BrokerHandle) -> None:
    head, moved = claim_behind_the_head(broker)
    assert broker.cancel(moved.id).status == S.RUNNING
    assert broker.cancel_requested(moved.id) is True
    assert broker.cancel_requested(head.id) is False
    assert broker.mark_canceled(moved.id, "w1") is True
    assert broker.get(moved.id).status == S.CANCELED
    assert event_types(broker, moved.id)[-1] == E.CANCELED
    # The head is still queued and the moved job never comes back.
    assert claimed_id(broker.claim("w2")) == head.id
    assert broker.claim("w2") is None


def test_a_canceled_moved_job_that_fails_retryably_does_not_run_again(
    broker: BrokerHandle,
) -> None:
    head, moved = claim_behind_the_head(broker)
    broker.cancel(moved.id)
    error = JobError(code="cuda_oom", message="out of memory")
    assert broker.fail(moved.id, "w1", error, retryable=True) is True
    assert broker.get(moved.id).status == S.CANCELED
    assert claimed_id(broker.claim("w2")) == head.id
    assert broker.claim("w2") is None


def test_a_moved_job_whose_worker_went_quiet_is_reclaimed(broker: BrokerHandle) -> None:
    head, moved = claim_behind_the_head(broker, "quiet")
    broker.heartbeat(WorkerInfo(id="quiet", current_job=moved.id))
    time.sleep(0.4)

    assert broker.reclaim(stale_after_s=0.2) == [moved.id]
    assert broker.reclaim(stale_after_s=0.2) == []
    assert broker.get(moved.id).status == S.QUEUED
    assert broker.get(head.id).status == S.QUEUED

    taken = {claimed_id(broker.claim("new")), claimed_id(broker.claim("new"))}
    assert taken == {head.id, moved.id}
    assert broker.get(moved.id).attempts == 2
    assert broker.complete(moved.id, "quiet", result()) is False
    assert broker.complete(moved.id, "new", result()) is True
    assert broker.claim("new") is None


def test_a_known_dead_worker_loses_its_moved_job(broker: BrokerHandle) -> None:
    _, moved = claim_behind_the_head(broker, "dead")
    assert broker.reclaim(stale_after_s=3600, worker_id="dead") == [moved.id]
    assert broker.get(moved.id).status == S.QUEUED


def test_a_job_moved_max_attempts_times_fails_as_worker_lost(broker: BrokerHandle) -> None:
    head = enqueue(broker, A, "head stays queued")
    job = enqueue(broker, B, "moved every time")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        worker_id = f"w{attempt}"
        claimed = prefer(broker, worker_id, B)
        assert claimed is not None and (claimed.id, claimed.attempts) == (job.id, attempt)
        assert broker.reclaim(stale_after_s=3600, worker_id=worker_id) == [job.id]

    stored = broker.get(job.id)
    assert stored.status == S.FAILED
    assert stored.error is not None and stored.error.code == "worker_lost"
    assert claimed_id(prefer(broker, "w9", B)) == head.id
    assert prefer(broker, "w9", B) is None


# --------------------------------------------------------------------------- Redis inside


# The tests below run on the Redis backend only.
redis_only = pytest.mark.parametrize("broker", ["redis"], indirect=True)


def _redis(broker: BrokerHandle) -> tuple[Any, str]:
    """The backend's client and key prefix."""
    from sdworker.broker.redis import RedisBroker

    assert isinstance(broker.current, RedisBroker)
    return broker.current._redis, broker.current._p


@redis_only
def test_redis_moved_entry_is_pending_in_the_affinity_stream(broker: BrokerHandle) -> None:
    r, p = _redis(broker)
    _, moved = claim_behind_the_head(broker)
    job = r.hgetall(f"{p}:job:{moved.id}")
    assert (job["stream"], job["entry_stream"]) == ("normal", "affinity")
    pending = r.xpending_range(f"{p}:stream:affinity", "workers", "-", "+", 10)
    assert [(e["message_id"], e["consumer"]) for e in pending] == [(job["entry"], "w1")]
    assert r.xlen(f"{p}:stream:normal") == 1  # the head's entry only
    assert r.xpending(f"{p}:stream:normal", "workers")["pending"] == 0

    time.sleep(0.3)
    broker.heartbeat(WorkerInfo(id="w1", current_job=moved.id))
    (entry,) = r.xpending_range(f"{p}:stream:affinity", "workers", "-", "+", 10)
    assert entry["time_since_delivered"] < 300  # the heartbeat re-claimed it

    error = JobError(code="cuda_oom", message="out of memory")
    assert broker.fail(moved.id, "w1", error, retryable=True)
    job = r.hgetall(f"{p}:job:{moved.id}")
    assert "entry_stream" not in job
    assert r.xlen(f"{p}:stream:affinity") == 0
    assert r.xpending(f"{p}:stream:affinity", "workers")["pending"] == 0
    assert [entry_id for entry_id, _ in r.xrange(f"{p}:stream:normal")][-1] == job["entry"]

    again = prefer(broker, "w2", B)
    assert claimed_id(again) == moved.id
    assert broker.complete(moved.id, "w2", result())
    assert r.xlen(f"{p}:stream:affinity") == 0
    assert r.xpending(f"{p}:stream:affinity", "workers")["pending"] == 0


@redis_only
def test_redis_records_without_a_model_count_as_the_default(broker: BrokerHandle) -> None:
    r, p = _redis(broker)
    enqueue(broker, A, "head")
    old = enqueue(broker, None, "queued before the upgrade")
    r.hdel(f"{p}:job:{old.id}", "model")
    assert claimed_id(prefer(broker, "w1", "")) == old.id


@redis_only
def test_redis_looks_at_a_bounded_number_of_entries_behind_the_head(
    broker: BrokerHandle,
) -> None:
    _redis(broker)
    from sdworker.broker.redis import AFFINITY_SCAN

    head = enqueue(broker, A, "head")
    fillers = [enqueue(broker, A, f"a {i}") for i in range(AFFINITY_SCAN)]
    behind = enqueue(broker, B, "behind")
    # AFFINITY_SCAN entries behind the head are looked at: `behind` is one too far...
    assert claimed_id(prefer(broker, "w1", B)) == head.id
    # ...and the last one looked at behind the next head.
    assert claimed_id(prefer(broker, "w1", B)) == behind.id
    assert claimed_id(prefer(broker, "w1", B)) == fillers[0].id


# --------------------------------------------------------------------------- SQLite migration

# The jobs table of the release before model affinity (batch keys, no model or queued_at).
BATCH_ERA_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    owner TEXT NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_id TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    heartbeat_at REAL,
    duration_s REAL,
    result TEXT,
    error_code TEXT,
    error_message TEXT,
    batch_key TEXT NOT NULL DEFAULT '',
    num_images INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_claim ON jobs (status, priority DESC, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
"""


def make_batch_era_database(path: Path, jobs: list[tuple[str, str, JobSpec]]) -> None:
    """(id, status, spec) rows, made 60 s ago; running ones held by worker `old`."""
    db = sqlite3.connect(path)
    try:
        db.executescript(BATCH_ERA_SCHEMA)
        made = time.time() - 60
        for job_id, status, spec in jobs:
            running = status == "running"
            db.execute(
                "INSERT INTO jobs (id, status, priority, owner, spec, spec_hash, created_at, "
                "batch_key, num_images, attempts, worker_id, started_at, heartbeat_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id, status, spec.priority.rank, owner_of(spec), spec.model_dump_json(),
                    spec_digest(spec), made, batch_key_of(spec) or "", spec.num_images,
                    int(running), "old" if running else None, made if running else None,
                    made if running else None,
                ),
            )  # fmt: skip
        db.commit()
    finally:
        db.close()


def jobs_table(path: Path) -> dict[str, dict[str, object]]:
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return {row["id"]: dict(row) for row in db.execute("SELECT * FROM jobs")}
    finally:
        db.close()


def open_sqlite(path: Path) -> Broker:
    from sdworker.broker.sqlite import SqliteBroker

    return SqliteBroker(path=path, max_attempts=MAX_ATTEMPTS)


def test_sqlite_migrates_a_database_without_the_model_column(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    make_batch_era_database(
        path,
        [
            ("01OLDHEAD0000000000000000A", "queued", JobSpec(prompt="head", model=A)),
            ("01OLDBEHIND00000000000000B", "queued", JobSpec(prompt="behind", model=B)),
            ("01OLDRUNNING0000000000000B", "running", JobSpec(prompt="running", model=B)),
            ("01OLDDEFAULT0000000000000D", "queued", JobSpec(prompt="default")),
        ],
    )
    broker = open_sqlite(path)
    try:
        table = jobs_table(path)
        assert {job_id: row["model"] for job_id, row in table.items()} == {
            "01OLDHEAD0000000000000000A": A,
            "01OLDBEHIND00000000000000B": B,
            "01OLDRUNNING0000000000000B": B,
            "01OLDDEFAULT0000000000000D": "",
        }
        assert all(row["queued_at"] == row["created_at"] for row in table.values())

        # Queued 60 s ago by the old version: passed over for a 1-hour wait, taken at 30 s.
        assert claimed_id(prefer(broker, "w1", B)) == "01OLDBEHIND00000000000000B"
        assert claimed_id(prefer(broker, "w1", B, wait_s=30)) == "01OLDHEAD0000000000000000A"
        # The job that was running comes back with its model.
        assert broker.reclaim(stale_after_s=3600, worker_id="old") == ["01OLDRUNNING0000000000000B"]
        assert claimed_id(prefer(broker, "w1", B)) == "01OLDRUNNING0000000000000B"
        new = enqueue(broker, B, "new")
        assert claimed_id(prefer(broker, "w1", B)) == new.id  # behind the default one
        assert claimed_id(broker.claim("w1")) == "01OLDDEFAULT0000000000000D"
    finally:
        broker.close()
    open_sqlite(path).close()  # migrated once: opening again changes nothing


def test_sqlite_migrates_the_oldest_database_too(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    make_old_database(path, JobSpec(prompt="from the first release", model=B))
    broker = open_sqlite(path)
    try:
        row = jobs_table(path)[OLD_JOB_ID]
        assert (row["model"], row["queued_at"]) == (B, row["created_at"])
        enqueue(broker, A, "new")
        assert claimed_id(prefer(broker, "w1", B)) == OLD_JOB_ID
    finally:
        broker.close()
