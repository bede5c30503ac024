"""Cross-job batching in the Broker contract: batch claims, batch heartbeats, batch keys.

`claim(worker_id, batch_key=..., max_images=...)` takes the head of the queue (highest
priority, then oldest) only when it fits the batch, and otherwise takes nothing: a batch
never takes jobs out of order. A heartbeat keeps every job of a batch alive. The broker
tests run on every backend through the `broker` fixture (tests/broker/conftest.py).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from sdworker.broker.base import Broker, WorkerInfo
from sdworker.broker.records import spec_digest
from sdworker.families import Task
from sdworker.jobs import (
    BATCH_VARYING_FIELDS,
    EventType,
    Job,
    JobSpec,
    JobStatus,
    Priority,
    batch_key_of,
    owner_of,
)
from tests.broker.conftest import MAX_ATTEMPTS, BrokerHandle

S = JobStatus
E = EventType

# Two kinds of job: COMPATIBLE ones share a batch key, the ODD one has another.
STEPS = 20
ODD_STEPS = 30


# --------------------------------------------------------------------------- helpers


def make_spec(prompt: str = "a red fox in snow", **kwargs: object) -> JobSpec:
    fields: dict[str, object] = {"steps": STEPS, "size": "512x512"}
    fields.update(kwargs)
    return JobSpec(prompt=prompt, **fields)


KEY = batch_key_of(make_spec())
ODD_KEY = batch_key_of(make_spec(steps=ODD_STEPS))


def enqueue(broker: Broker, prompt: str = "a red fox in snow", **kwargs: object) -> Job:
    job, created = broker.enqueue(make_spec(prompt, **kwargs))
    assert created
    return job


def odd(broker: Broker, prompt: str = "an odd one") -> Job:
    """A queued job whose batch key is ODD_KEY, not KEY."""
    return enqueue(broker, prompt, steps=ODD_STEPS)


def claimed_id(job: Job | None) -> str | None:
    return None if job is None else job.id


def event_types(broker: Broker, job_id: str) -> list[EventType]:
    return [event.type for event in broker.events(job_id)]


def assert_untouched(broker: Broker, *jobs: Job) -> None:
    """Still queued, never started, at the same place in the queue."""
    for job in jobs:
        stored = broker.get(job.id)
        assert stored.status == S.QUEUED, job.spec.prompt
        assert stored.attempts == 0
        assert stored.worker_id is None
        assert event_types(broker, job.id) == [E.QUEUED]


def test_the_test_keys_differ() -> None:
    assert KEY != ODD_KEY


# --------------------------------------------------------------------------- batch claim


def test_a_batch_claim_takes_the_head_when_its_key_matches(broker: BrokerHandle) -> None:
    first = enqueue(broker, "first")
    second = enqueue(broker, "second", seed=5, num_images=2)

    a = broker.claim("w1", batch_key=KEY, max_images=8)
    b = broker.claim("w1", batch_key=KEY, max_images=8)

    assert claimed_id(a) == first.id
    assert claimed_id(b) == second.id
    for job in (a, b):
        assert job is not None
        assert (job.status, job.worker_id, job.attempts) == (S.RUNNING, "w1", 1)
        stored = broker.get(job.id)
        assert (stored.status, stored.worker_id) == (S.RUNNING, "w1")
        assert event_types(broker, job.id) == [E.QUEUED, E.STARTED]
    assert broker.claim("w1", batch_key=KEY, max_images=8) is None  # the queue is empty
    assert broker.stats().running == 2


def test_a_batch_claim_without_max_images_takes_any_number_of_images(
    broker: BrokerHandle,
) -> None:
    big = enqueue(broker, "big", num_images=64)
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == big.id


def test_a_batch_claim_takes_nothing_when_the_head_has_another_key(broker: BrokerHandle) -> None:
    head = odd(broker, "head")
    later = enqueue(broker, "later, compatible")

    assert broker.claim("w1", batch_key=KEY, max_images=8) is None
    assert broker.claim("w1", batch_key=KEY) is None

    assert_untouched(broker, head, later)
    assert broker.get(head.id).queue_position == 1
    assert broker.get(later.id).queue_position == 2
    assert broker.stats().running == 0

    # The head is still the head: a plain claim takes it, then the batch can go on.
    assert claimed_id(broker.claim("w2")) == head.id
    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=8)) == later.id
    assert broker.claim("w1") is None


def test_a_refused_batch_claim_leaves_the_order_of_plain_claims(broker: BrokerHandle) -> None:
    jobs = [odd(broker, "o1"), enqueue(broker, "c1"), odd(broker, "o2"), enqueue(broker, "c2")]

    for _ in range(3):
        assert broker.claim("w1", batch_key=KEY, max_images=8) is None

    assert [claimed_id(broker.claim("w2")) for _ in jobs] == [job.id for job in jobs]
    assert broker.claim("w2") is None


def test_a_batch_claim_of_the_odd_key_takes_the_odd_head(broker: BrokerHandle) -> None:
    head = odd(broker)
    enqueue(broker, "compatible")
    assert broker.claim("w1", batch_key=KEY) is None
    assert claimed_id(broker.claim("w1", batch_key=ODD_KEY)) == head.id


def test_a_batch_claim_stops_at_the_first_odd_job(broker: BrokerHandle) -> None:
    c1, c2 = enqueue(broker, "c1"), enqueue(broker, "c2")
    o = odd(broker)
    c3 = enqueue(broker, "c3")

    batch = []
    while (job := broker.claim("w1", batch_key=KEY, max_images=8)) is not None:
        batch.append(job.id)
        assert len(batch) < 10
    assert batch == [c1.id, c2.id]
    assert_untouched(broker, o, c3)
    assert [claimed_id(broker.claim("w2")) for _ in range(2)] == [o.id, c3.id]


def test_an_unknown_batch_key_takes_nothing(broker: BrokerHandle) -> None:
    job = enqueue(broker)
    assert broker.claim("w1", batch_key="no-such-key") is None
    assert_untouched(broker, job)
    assert claimed_id(broker.claim("w1")) == job.id


# --------------------------------------------------------------------------- priorities


def test_a_higher_priority_odd_job_blocks_a_batch(broker: BrokerHandle) -> None:
    compatible = enqueue(broker, "normal, compatible")
    urgent = enqueue(broker, "high, odd", steps=ODD_STEPS, priority=Priority.HIGH)

    assert broker.claim("w1", batch_key=KEY, max_images=8) is None
    assert_untouched(broker, compatible, urgent)

    assert claimed_id(broker.claim("w2")) == urgent.id
    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=8)) == compatible.id


def test_a_batch_claim_takes_the_highest_priority_compatible_head(broker: BrokerHandle) -> None:
    low_odd = enqueue(broker, "low, odd", steps=ODD_STEPS, priority=Priority.LOW)
    normal = enqueue(broker, "normal", priority=Priority.NORMAL)
    urgent = enqueue(broker, "urgent", priority=Priority.URGENT)

    assert claimed_id(broker.claim("w1", batch_key=KEY)) == urgent.id
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == normal.id
    assert broker.claim("w1", batch_key=KEY) is None  # the low odd job is the head now
    assert_untouched(broker, low_odd)


def test_priority_does_not_change_the_batch_key(broker: BrokerHandle) -> None:
    high = enqueue(broker, "high", priority=Priority.HIGH)
    low = enqueue(broker, "low", priority=Priority.LOW)
    assert batch_key_of(high.spec) == batch_key_of(low.spec) == KEY
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == high.id
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == low.id


# --------------------------------------------------------------------------- max_images


def test_a_head_with_more_images_than_max_images_is_not_taken(broker: BrokerHandle) -> None:
    big = enqueue(broker, "big", num_images=4)
    small = enqueue(broker, "small", num_images=1)

    assert broker.claim("w1", batch_key=KEY, max_images=3) is None
    assert broker.claim("w1", batch_key=KEY, max_images=1) is None
    assert_untouched(broker, big, small)

    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=4)) == big.id  # at most
    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=1)) == small.id


def test_max_images_applies_only_to_the_head(broker: BrokerHandle) -> None:
    big = enqueue(broker, "big", num_images=6)
    small = enqueue(broker, "small", num_images=2)
    assert broker.claim("w1", batch_key=KEY, max_images=2) is None  # small is not the head
    assert_untouched(broker, big, small)
    assert claimed_id(broker.claim("w1")) == big.id
    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=2)) == small.id


def test_max_images_zero_fits_no_job(broker: BrokerHandle) -> None:
    job = enqueue(broker, num_images=1)
    assert broker.claim("w1", batch_key=KEY, max_images=0) is None
    assert_untouched(broker, job)


# --------------------------------------------------------------------------- canceled jobs


def test_a_canceled_head_is_skipped_by_a_batch_claim(broker: BrokerHandle) -> None:
    canceled = enqueue(broker, "canceled")
    wanted = enqueue(broker, "wanted")
    assert broker.cancel(canceled.id).status == S.CANCELED

    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=8)) == wanted.id
    stored = broker.get(canceled.id)
    assert (stored.status, stored.attempts) == (S.CANCELED, 0)
    assert E.STARTED not in event_types(broker, canceled.id)


def test_a_canceled_odd_head_does_not_block_a_batch(broker: BrokerHandle) -> None:
    blocker = odd(broker, "odd, canceled")
    wanted = enqueue(broker, "wanted")
    assert broker.claim("w1", batch_key=KEY) is None
    broker.cancel(blocker.id)

    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=8)) == wanted.id
    assert broker.get(blocker.id).status == S.CANCELED


def test_a_canceled_big_head_does_not_block_a_batch(broker: BrokerHandle) -> None:
    big = enqueue(broker, "big, canceled", num_images=16)
    wanted = enqueue(broker, "wanted", num_images=2)
    broker.cancel(big.id)
    assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=4)) == wanted.id


def test_a_canceled_higher_priority_head_is_skipped(broker: BrokerHandle) -> None:
    urgent = enqueue(broker, "urgent odd, canceled", steps=ODD_STEPS, priority=Priority.URGENT)
    normal = enqueue(broker, "normal, compatible")
    broker.cancel(urgent.id)
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == normal.id


def test_after_canceled_heads_the_next_odd_job_still_blocks(broker: BrokerHandle) -> None:
    canceled = [enqueue(broker, f"canceled {i}") for i in range(3)]
    blocker = odd(broker)
    later = enqueue(broker, "later")
    for job in canceled:
        broker.cancel(job.id)

    assert broker.claim("w1", batch_key=KEY) is None
    assert_untouched(broker, blocker, later)
    assert [claimed_id(broker.claim("w2")) for _ in range(2)] == [blocker.id, later.id]
    assert all(broker.get(job.id).status == S.CANCELED for job in canceled)


def test_a_reclaimed_job_can_join_a_batch(broker: BrokerHandle) -> None:
    job = enqueue(broker)
    assert claimed_id(broker.claim("dead")) == job.id
    assert broker.reclaim(stale_after_s=3600, worker_id="dead") == [job.id]

    again = broker.claim("w1", batch_key=KEY, max_images=8)

    assert claimed_id(again) == job.id
    assert again is not None and (again.worker_id, again.attempts) == ("w1", 2)


def test_batch_and_plain_claims_interleave_in_queue_order(broker: BrokerHandle) -> None:
    jobs = [enqueue(broker, f"c{i}") for i in range(6)]
    order = [
        broker.claim("w1"),
        broker.claim("w1", batch_key=KEY),
        broker.claim("w2"),
        broker.claim("w2", batch_key=KEY, max_images=1),
        broker.claim("w1", batch_key=KEY),
        broker.claim("w1"),
    ]
    assert [claimed_id(job) for job in order] == [job.id for job in jobs]
    assert broker.claim("w1", batch_key=KEY) is None
    assert broker.claim("w1") is None


# --------------------------------------------------------------------------- heartbeats


def test_jobs_held_lists_the_current_job_first_without_duplicates() -> None:
    assert WorkerInfo(id="w").jobs_held() == []
    assert WorkerInfo(id="w", current_job="a").jobs_held() == ["a"]
    assert WorkerInfo(id="w", batch_jobs=["a", "b"]).jobs_held() == ["a", "b"]
    assert WorkerInfo(id="w", current_job="b", batch_jobs=["a", "b"]).jobs_held() == ["a", "b"]
    assert WorkerInfo(id="w", current_job="c", batch_jobs=["a", "b"]).jobs_held() == [
        "c",
        "a",
        "b",
    ]


def test_worker_info_round_trips_batch_jobs() -> None:
    info = WorkerInfo(id="w", current_job="a", batch_jobs=["a", "b"])
    assert WorkerInfo.model_validate_json(info.model_dump_json()).batch_jobs == ["a", "b"]
    assert WorkerInfo(id="w").batch_jobs == []


def test_a_heartbeat_keeps_every_job_of_the_batch_alive(broker: BrokerHandle) -> None:
    a = enqueue(broker, "a")
    b = enqueue(broker, "b")
    stray = enqueue(broker, "held by w1, not in its batch")
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == a.id
    assert claimed_id(broker.claim("w1", batch_key=KEY)) == b.id
    assert claimed_id(broker.claim("w1")) == stray.id
    info = WorkerInfo(id="w1", batch_jobs=[a.id, b.id])
    broker.heartbeat(info)
    time.sleep(0.4)
    broker.heartbeat(info)  # still alive

    assert broker.reclaim(stale_after_s=0.2) == [stray.id]

    for job in (a, b):
        stored = broker.get(job.id)
        assert (stored.status, stored.worker_id, stored.attempts) == (S.RUNNING, "w1", 1)
    assert broker.get(stray.id).status == S.QUEUED

    # Heartbeats go on: the batch stays alive round after round.
    time.sleep(0.4)
    broker.heartbeat(info)
    assert broker.reclaim(stale_after_s=0.2) == []
    assert {broker.get(job.id).status for job in (a, b)} == {S.RUNNING}
    assert [w.batch_jobs for w in broker.workers()] == [[a.id, b.id]]


def test_a_heartbeat_keeps_the_current_job_and_the_batch_alive(broker: BrokerHandle) -> None:
    current = enqueue(broker, "current")
    other = enqueue(broker, "other")
    stray = enqueue(broker, "stray")
    for job in (current, other, stray):
        assert claimed_id(broker.claim("w1", batch_key=KEY)) == job.id
    time.sleep(0.4)
    broker.heartbeat(WorkerInfo(id="w1", current_job=current.id, batch_jobs=[other.id]))

    assert broker.reclaim(stale_after_s=0.2) == [stray.id]
    assert broker.get(current.id).status == S.RUNNING
    assert broker.get(other.id).status == S.RUNNING


def test_a_batch_stops_being_kept_alive_when_heartbeats_stop(broker: BrokerHandle) -> None:
    a, b = enqueue(broker, "a"), enqueue(broker, "b")
    for _ in range(2):
        broker.claim("w1", batch_key=KEY)
    broker.heartbeat(WorkerInfo(id="w1", batch_jobs=[a.id, b.id]))
    time.sleep(0.4)

    assert sorted(broker.reclaim(stale_after_s=0.2)) == sorted([a.id, b.id])
    assert {broker.get(job.id).status for job in (a, b)} == {S.QUEUED}


def test_a_heartbeat_does_not_keep_another_workers_job_alive(broker: BrokerHandle) -> None:
    mine = enqueue(broker, "mine")
    theirs = enqueue(broker, "theirs")
    assert claimed_id(broker.claim("w1")) == mine.id
    assert claimed_id(broker.claim("quiet")) == theirs.id
    time.sleep(0.4)
    broker.heartbeat(WorkerInfo(id="w1", batch_jobs=[mine.id, theirs.id]))

    assert broker.reclaim(stale_after_s=0.2) == [theirs.id]
    assert broker.get(mine.id).status == S.RUNNING


def test_a_dead_worker_loses_its_whole_batch(broker: BrokerHandle) -> None:
    jobs = [enqueue(broker, f"j{i}") for i in range(3)]
    for _ in jobs:
        broker.claim("dead", batch_key=KEY)
    broker.heartbeat(WorkerInfo(id="dead", batch_jobs=[job.id for job in jobs]))

    reclaimed = broker.reclaim(stale_after_s=3600, worker_id="dead")

    assert sorted(reclaimed) == sorted(job.id for job in jobs)
    assert {broker.get(job.id).status for job in jobs} == {S.QUEUED}


# --------------------------------------------------------------------------- batch_key_of


def base_spec(**kwargs: object) -> JobSpec:
    fields: dict[str, object] = {
        "prompt": "a lighthouse at dusk",
        "negative_prompt": "blurry",
        "model": "tiny-sdxl",
        "size": "512x512",
        "steps": 20,
        "guidance_scale": 5.0,
        "scheduler": None,
    }
    fields.update(kwargs)
    return JobSpec(**fields)


def image_spec(**kwargs: object) -> JobSpec:
    fields: dict[str, object] = {"image": "https://example.test/a.png", "strength": 0.5}
    fields.update(kwargs)
    return base_spec(**fields)


def test_batch_key_is_a_stable_string() -> None:
    key = batch_key_of(base_spec())
    assert isinstance(key, str) and key
    assert batch_key_of(base_spec()) == key
    assert batch_key_of(base_spec(metadata={"b": 1, "a": 2})) == key


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a completely different prompt"},
        {"prompt": ""},
        {"negative_prompt": "ugly, low quality"},
        {"num_images": 7},
        {"seed": 1234},
        {"priority": Priority.URGENT},
        {"output_format": "webp"},
        {"return_base64": True},
        {"return_latents": True},
        {"webhook": "https://hooks.example.test/x", "webhook_progress": True},
        {"metadata": {"user_id": "alice", "tag": [1, 2]}},
    ],
    ids=lambda change: ",".join(change),
)
def test_batch_key_ignores_per_job_fields(change: dict[str, object]) -> None:
    assert set(change) <= BATCH_VARYING_FIELDS
    assert batch_key_of(base_spec(**change)) == batch_key_of(base_spec())


@pytest.mark.parametrize(
    "change",
    [
        {"image": "https://example.test/b.png"},
        {"image": "https://example.test/b.png", "mask": "https://example.test/m1.png"},
    ],
    ids=["image", "mask"],
)
def test_batch_key_ignores_which_input_image(change: dict[str, object]) -> None:
    reference = image_spec(mask="https://example.test/m0.png") if "mask" in change else image_spec()
    assert batch_key_of(image_spec(**change)) == batch_key_of(reference)


@pytest.mark.parametrize(
    "change",
    [
        {"size": "768x512"},
        {"size": "512x768"},
        {"size": None, "width": 512, "height": 640},
        {"steps": 21},
        {"scheduler": "euler"},
        {"guidance_scale": 7.5},
        {"model": "another-model"},
        {"model": None},
        {"task": Task.TEXT2IMG},
        {"preset": "sdxl_image_fast"},
    ],
    ids=lambda change: ",".join(change),
)
def test_batch_key_depends_on_what_shapes_the_denoising_loop(change: dict[str, object]) -> None:
    assert batch_key_of(base_spec(**change)) != batch_key_of(base_spec())


@pytest.mark.parametrize(
    "change",
    [
        {"strength": 0.8},
        {"task": Task.INPAINT, "mask": "https://example.test/m.png"},
        {"resize_mode": "pad"},
        {"exact_copy_mode": True},
        {"image": None, "strength": None},
    ],
    ids=lambda change: ",".join(change),
)
def test_batch_key_depends_on_the_image_task_fields(change: dict[str, object]) -> None:
    assert batch_key_of(image_spec(**change)) != batch_key_of(image_spec())


def test_batch_key_separates_with_and_without_a_negative_prompt() -> None:
    with_negative = base_spec(negative_prompt="blurry")
    other_negative = base_spec(negative_prompt="watermark, text")
    without = base_spec(negative_prompt=None)
    empty = base_spec(negative_prompt="")  # planned as no negative prompt

    assert batch_key_of(with_negative) == batch_key_of(other_negative)
    assert batch_key_of(with_negative) != batch_key_of(without)
    assert batch_key_of(without) == batch_key_of(empty)


def test_the_varying_fields_are_spec_fields_and_leave_the_loop_shapers_out() -> None:
    assert set(JobSpec.model_fields) >= BATCH_VARYING_FIELDS
    shapers = {"task", "model", "width", "height", "size", "steps", "guidance_scale"}
    shapers |= {"scheduler", "strength", "reference_strength", "exact_copy_mode", "preset"}
    assert not shapers & BATCH_VARYING_FIELDS


def test_the_broker_uses_batch_key_of(broker: BrokerHandle) -> None:
    spec = base_spec(negative_prompt=None, num_images=3)
    job, _ = broker.enqueue(spec)
    assert broker.claim("w1", batch_key=batch_key_of(base_spec())) is None  # has a negative
    assert claimed_id(broker.claim("w1", batch_key=batch_key_of(spec), max_images=3)) == job.id


# --------------------------------------------------------------------------- SQLite migration

# The jobs table as the release before cross-job batching made it (no batch_key, num_images).
OLD_SCHEMA = """
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
    error_message TEXT
);
CREATE INDEX jobs_claim ON jobs (status, priority DESC, seq);
CREATE INDEX jobs_owner ON jobs (owner, seq);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX events_job ON events (job_id, id);
"""

OLD_JOB_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"


def make_old_database(path: Path, spec: JobSpec) -> None:
    db = sqlite3.connect(path)
    try:
        db.executescript(OLD_SCHEMA)
        now = time.time() - 60
        db.execute(
            "INSERT INTO jobs (id, status, priority, owner, spec, spec_hash, created_at) "
            "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
            (
                OLD_JOB_ID,
                spec.priority.rank,
                owner_of(spec),
                spec.model_dump_json(),
                spec_digest(spec),
                now,
            ),
        )
        db.execute(
            "INSERT INTO events (job_id, type, data, created_at) VALUES (?, 'queued', ?, ?)",
            (OLD_JOB_ID, '{"priority": "normal"}', now),
        )
        db.commit()
    finally:
        db.close()


def job_columns(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    finally:
        db.close()


def open_sqlite(path: Path) -> Broker:
    from sdworker.broker.sqlite import SqliteBroker

    return SqliteBroker(path=path, max_attempts=MAX_ATTEMPTS)


def test_sqlite_migrates_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    old_spec = make_spec("queued before the upgrade", num_images=2, metadata={"user_id": "bob"})
    make_old_database(path, old_spec)
    assert not {"batch_key", "num_images"} & job_columns(path)

    broker = open_sqlite(path)
    try:
        assert {"batch_key", "num_images"} <= job_columns(path)
        old = broker.get(OLD_JOB_ID)
        assert (old.status, old.spec, old.queue_position) == (S.QUEUED, old_spec, 1)

        new_a = broker.enqueue(make_spec("new a"))[0]
        new_b = broker.enqueue(make_spec("new b", num_images=3))[0]

        # The old job is still the head, backfilled with its key and image count: too big
        # for a 1-image batch slot, and claimed by a batch that has room.
        assert broker.claim("w1", batch_key=KEY, max_images=1) is None
        assert broker.get(OLD_JOB_ID).status == S.QUEUED
        claimed = broker.claim("w1", batch_key=KEY, max_images=8)
        assert claimed is not None and claimed.id == OLD_JOB_ID
        assert (claimed.spec, claimed.attempts) == (old_spec, 1)
        assert [e.type for e in broker.events(OLD_JOB_ID)] == [E.QUEUED, E.STARTED]

        # New jobs behind it get their batch key and image count.
        assert claimed_id(broker.claim("w2", batch_key=KEY, max_images=2)) == new_a.id
        assert broker.claim("w2", batch_key=KEY, max_images=2) is None  # new_b has 3
        assert claimed_id(broker.claim("w2", batch_key=KEY, max_images=3)) == new_b.id
    finally:
        broker.close()


def test_sqlite_batch_claims_new_jobs_after_a_migration(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    make_old_database(path, make_spec("old", num_images=1))

    broker = open_sqlite(path)
    try:
        old = broker.claim("w1")
        assert old is not None and old.id == OLD_JOB_ID
        new_a = broker.enqueue(make_spec("new a"))[0]
        new_b = broker.enqueue(make_spec("new b", num_images=3))[0]
        new_odd = broker.enqueue(make_spec("new odd", steps=ODD_STEPS))[0]

        assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=8)) == new_a.id
        assert broker.claim("w1", batch_key=KEY, max_images=2) is None  # new_b has 3
        assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=3)) == new_b.id
        assert broker.claim("w1", batch_key=KEY) is None  # new_odd is the head
        assert claimed_id(broker.claim("w1", batch_key=ODD_KEY)) == new_odd.id
    finally:
        broker.close()


def test_sqlite_migration_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    make_old_database(path, make_spec("old"))
    open_sqlite(path).close()
    broker = open_sqlite(path)  # the columns exist now: no second ALTER TABLE
    try:
        job = broker.enqueue(make_spec("new"))[0]
        assert claimed_id(broker.claim("w1")) == OLD_JOB_ID
        assert claimed_id(broker.claim("w1", batch_key=KEY)) == job.id
    finally:
        broker.close()


def test_sqlite_old_queued_jobs_can_join_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    old_spec = make_spec("old", num_images=4)
    make_old_database(path, old_spec)
    broker = open_sqlite(path)
    try:
        assert batch_key_of(old_spec) == KEY
        # The contract: the head is taken when batch_key_of(its spec) is the batch key
        # and it has at most max_images images.
        assert broker.claim("w1", batch_key=KEY, max_images=3) is None
        assert claimed_id(broker.claim("w1", batch_key=KEY, max_images=4)) == OLD_JOB_ID
    finally:
        broker.close()


def test_multi_image_inpainting_jobs_never_join_a_batch() -> None:
    spec = make_spec(image="http://example.test/a.png", mask="http://example.test/m.png")
    assert batch_key_of(spec) is not None
    assert batch_key_of(spec.model_copy(update={"num_images": 2})) is None


def test_a_job_that_runs_alone_is_never_taken_by_a_batch_claim(broker: BrokerHandle) -> None:
    alone = enqueue(
        broker,
        image="http://example.test/a.png",
        mask="http://example.test/m.png",
        num_images=2,
    )
    assert broker.claim("w1", batch_key="") is None
    assert_untouched(broker, alone)
    assert claimed_id(broker.claim("w1")) == alone.id
