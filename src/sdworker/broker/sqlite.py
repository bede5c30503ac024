"""The embedded broker: one SQLite file in WAL mode, shared by the API and worker processes.

Every state change and its event are written in one transaction, so a job acknowledged
to a caller (the enqueue committed) survives a crash of any process. WAL with
synchronous=NORMAL keeps commits durable across process crashes; only an OS crash or
power loss can lose the last transactions.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ulid import ULID

from sdworker.broker.base import (
    DEFAULT_MAX_ATTEMPTS,
    DURATION_BUCKETS_S,
    BrokerStats,
    WorkerInfo,
)
from sdworker.broker.records import (
    PRIORITY_BY_RANK,
    WORKER_RETENTION_S,
    job_from_record,
    model_key,
    spec_digest,
    timestamp,
)
from sdworker.errors import JobConflictError, JobNotFoundError
from sdworker.jobs import (
    EventType,
    Job,
    JobError,
    JobEvent,
    JobProgress,
    JobResult,
    JobSpec,
    JobStatus,
    Priority,
    WebhookAttempt,
    batch_key_of,
    owner_of,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
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
    num_images INTEGER NOT NULL DEFAULT 1,
    model TEXT NOT NULL DEFAULT '',
    queued_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (status, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, id);
CREATE TABLE IF NOT EXISTS webhook_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    attempt TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_attempts_job ON webhook_attempts (job_id, id);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    info TEXT NOT NULL,
    last_seen REAL NOT NULL
);
"""

_ADDED_COLUMNS = {
    "batch_key": "TEXT NOT NULL DEFAULT ''",
    "num_images": "INTEGER NOT NULL DEFAULT 1",
    "model": "TEXT NOT NULL DEFAULT ''",
    # When the job last entered the queue (enqueue or requeue): claim's affinity wait.
    "queued_at": "REAL NOT NULL DEFAULT 0",
}

# Indexes on added columns: made after the migration, which an old database needs first.
_MIGRATED_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_affinity ON jobs (status, priority, model, seq);
"""

EVENT_POLL_S = 0.05  # how often wait_for_events looks again


_SQLITE_INT_MAX = 2**63 - 1


class SqliteBroker:
    """Broker on a SQLite file; safe across threads (a connection per thread) and
    processes (WAL, busy timeout, BEGIN IMMEDIATE for every write)."""

    def __init__(self, path: Path, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> None:
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._max_attempts = max_attempts
        self._local = threading.local()
        # thread -> its connection; connections of finished threads are closed when the
        # next one opens (thread pools retire and start threads all the time).
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        self._connections_lock = threading.Lock()
        self._connection().executescript(_SCHEMA)
        self._migrate()
        self._connection().executescript(_MIGRATED_INDEXES)

    def _migrate(self) -> None:
        """Columns added after the first release, for databases made before them."""
        db = self._connection()
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        missing = [column for column in _ADDED_COLUMNS if column not in columns]
        if not missing:
            return
        with self._write() as write:
            # Again inside the lock: another process may have migrated meanwhile.
            columns = {row[1] for row in write.execute("PRAGMA table_info(jobs)")}
            for column in _ADDED_COLUMNS:
                if column not in columns:
                    definition = _ADDED_COLUMNS[column]
                    write.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")
            # Jobs that can still be claimed (queued, or running and maybe requeued) get
            # their batch key and model, so they can join batches and affinity claims.
            claimable = write.execute(
                "SELECT seq, spec FROM jobs WHERE status IN ('queued', 'running')"
            )
            for row in claimable.fetchall():
                try:
                    spec = JobSpec.model_validate_json(row["spec"])
                except ValueError:  # a spec this version refuses: it runs alone, or fails
                    continue
                write.execute(
                    "UPDATE jobs SET batch_key = ?, num_images = ?, model = ? WHERE seq = ?",
                    (batch_key_of(spec) or "", spec.num_images, model_key(spec), row["seq"]),
                )
            # Queued since they were made, as far as anyone knows.
            write.execute("UPDATE jobs SET queued_at = created_at WHERE queued_at = 0")

    # -- connections and transactions -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            # check_same_thread off only so close() can close every thread's connection.
            db = sqlite3.connect(
                self._path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
            with self._connections_lock:
                for thread in [t for t in self._connections if not t.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = db
        return db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections.values():
                db.close()
            self._connections.clear()
        self._local = threading.local()

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _emit(db: sqlite3.Connection, job_id: str, kind: EventType, data: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (job_id, type, data, created_at) VALUES (?, ?, ?, ?)",
            (job_id, kind.value, json.dumps(data), time.time()),
        )

    def _row(self, db: sqlite3.Connection, job_id: str) -> sqlite3.Row:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job with id {job_id!r}", field="id")
        return row

    def _job(self, db: sqlite3.Connection, row: sqlite3.Row, *, position: bool = False) -> Job:
        """A row as a Job; with position, its place in the queue (a count: get() only)."""
        attempts = [
            WebhookAttempt.model_validate_json(attempt)
            for (attempt,) in db.execute(
                "SELECT attempt FROM webhook_attempts WHERE job_id = ? ORDER BY id", (row["id"],)
            )
        ]
        job = job_from_record(dict(row), attempts)
        if position and job.status is JobStatus.QUEUED:
            # Two index range counts (an OR in one WHERE would scan every queued row).
            job.queue_position = db.execute(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND priority > ?)"
                " + (SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND priority = ?"
                " AND seq <= ?)",
                (row["priority"], row["priority"], row["seq"]),
            ).fetchone()[0]
        return job

    @staticmethod
    def _held(db: sqlite3.Connection, job_id: str, worker_id: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = db.execute(
            "SELECT * FROM jobs WHERE id = ? AND status = 'running' AND worker_id = ?",
            (job_id, worker_id),
        ).fetchone()
        return row

    # -- the contract ------------------------------------------------------------------

    def enqueue(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        spec_json = spec.model_dump_json()
        spec_hash = spec_digest(spec)
        now = time.time()
        with self._write() as db:
            if idempotency_key is not None:
                earlier = db.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if earlier is not None:
                    if earlier["spec_hash"] != spec_hash:
                        raise JobConflictError(
                            f"Idempotency-Key {idempotency_key!r} was used for job "
                            f"{earlier['id']} with a different request body",
                            field="Idempotency-Key",
                        )
                    return self._job(db, earlier, position=True), False
            job_id = str(ULID())
            db.execute(
                "INSERT INTO jobs (id, status, priority, owner, spec, spec_hash, "
                "idempotency_key, created_at, batch_key, num_images, model, queued_at) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    spec.priority.rank,
                    owner_of(spec),
                    spec_json,
                    spec_hash,
                    idempotency_key,
                    now,
                    batch_key_of(spec) or "",
                    spec.num_images,
                    model_key(spec),
                    now,
                ),
            )
            self._emit(db, job_id, EventType.QUEUED, {"priority": spec.priority.value})
            row = self._row(db, job_id)
        # Outside the write transaction: the position count must not hold the lock.
        return self._job(self._connection(), row, position=True), True

    def claim(
        self,
        worker_id: str,
        *,
        batch_key: str | None = None,
        max_images: int | None = None,
        prefer_models: Collection[str] = (),
        affinity_wait_s: float = 0.0,
    ) -> Job | None:
        now = time.time()
        # A read first: idle workers polling an empty queue never take the write lock.
        if (
            self._connection()
            .execute("SELECT 1 FROM jobs WHERE status = 'queued' LIMIT 1")
            .fetchone()
            is None
        ):
            return None
        with self._write() as db:
            head = db.execute(
                "SELECT seq, priority, batch_key, num_images, model, queued_at FROM jobs "
                "WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT 1"
            ).fetchone()
            if head is None:
                return None
            if batch_key is not None:
                if (
                    head["batch_key"] in ("", None)
                    or head["batch_key"] != batch_key
                    or (max_images is not None and head["num_images"] > max_images)
                ):
                    return None  # only the head of the queue joins a batch: order is kept
                seq = head["seq"]
            else:
                seq = self._pick(db, head, prefer_models, affinity_wait_s, now)
            row = db.execute(
                "UPDATE jobs SET status = 'running', worker_id = ?, attempts = attempts + 1, "
                "started_at = ?, heartbeat_at = ?, step = 0, total_steps = 0 "
                "WHERE seq = ? RETURNING *",
                (worker_id, now, now, seq),
            ).fetchone()
            self._emit(
                db,
                row["id"],
                EventType.STARTED,
                {"worker_id": worker_id, "attempt": row["attempts"]},
            )
            return self._job(db, row)

    @staticmethod
    def _pick(
        db: sqlite3.Connection,
        head: sqlite3.Row,
        prefer_models: Collection[str],
        wait_s: float,
        now: float,
    ) -> int:
        """The seq of the job to take: the head, or the oldest job of its priority for a
        model the worker has loaded while the head has waited less than wait_s."""
        if (
            not prefer_models
            or wait_s <= 0
            or head["model"] in prefer_models
            or now - head["queued_at"] >= wait_s
        ):
            return int(head["seq"])
        models = sorted(set(prefer_models))
        other = db.execute(
            "SELECT seq FROM jobs WHERE status = 'queued' AND priority = ? "
            f"AND model IN ({', '.join('?' * len(models))}) ORDER BY seq LIMIT 1",
            (head["priority"], *models),
        ).fetchone()
        return int(head["seq"] if other is None else other["seq"])

    def heartbeat(self, info: WorkerInfo) -> None:
        now = time.time()
        seen = info.model_copy(update={"last_seen": timestamp(now)})
        with self._write() as db:
            db.execute(
                "INSERT INTO workers (id, info, last_seen) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET info = excluded.info, "
                "last_seen = excluded.last_seen",
                (info.id, seen.model_dump_json(), now),
            )
            # Only the job the worker says it holds: a claim whose reply the worker never
            # got (a broker blip) goes stale and is reclaimed instead of being kept alive.
            db.executemany(
                "UPDATE jobs SET heartbeat_at = ? "
                "WHERE id = ? AND status = 'running' AND worker_id = ?",
                [(now, job_id, info.id) for job_id in info.jobs_held()],
            )
            db.execute("DELETE FROM workers WHERE last_seen < ?", (now - WORKER_RETENTION_S,))

    def progress(self, job_id: str, worker_id: str, step: int, total_steps: int) -> None:
        with self._write() as db:
            if self._held(db, job_id, worker_id) is None:
                return
            db.execute(
                "UPDATE jobs SET step = ?, total_steps = ?, heartbeat_at = ? WHERE id = ?",
                (step, total_steps, time.time(), job_id),
            )
            percent = JobProgress(step=step, total_steps=total_steps).percent
            self._emit(
                db,
                job_id,
                EventType.PROGRESS,
                {"step": step, "total_steps": total_steps, "percent": percent},
            )

    def complete(self, job_id: str, worker_id: str, result: JobResult) -> bool:
        now = time.time()
        with self._write() as db:
            row = self._held(db, job_id, worker_id)
            if row is None:
                return False
            db.execute(
                "UPDATE jobs SET status = 'succeeded', finished_at = ?, result = ?, "
                "duration_s = ?, step = total_steps WHERE id = ?",
                (now, result.model_dump_json(), result.timings.total_s, job_id),
            )
            data = {
                "assets": [asset.model_dump(exclude={"base64"}) for asset in result.assets],
                "seeds": result.seeds,
            }
            self._emit(db, job_id, EventType.COMPLETED, data)
            return True

    def fail(
        self, job_id: str, worker_id: str, error: JobError, *, retryable: bool = False
    ) -> bool:
        with self._write() as db:
            row = self._held(db, job_id, worker_id)
            if row is None:
                return False
            if row["cancel_requested"]:
                self._finish_canceled(db, job_id, "running")
            elif retryable and row["attempts"] < self._max_attempts:
                self._requeue(db, job_id, reason=error.code)
            else:
                self._finish_failed(db, job_id, error)
            return True

    def _requeue(self, db: sqlite3.Connection, job_id: str, *, reason: str) -> None:
        # Back at its first place, but its affinity wait starts again (as on Redis).
        db.execute(
            "UPDATE jobs SET status = 'queued', worker_id = NULL, heartbeat_at = NULL, "
            "step = 0, total_steps = 0, queued_at = ? WHERE id = ?",
            (time.time(), job_id),
        )
        self._emit(db, job_id, EventType.QUEUED, {"reason": reason})

    def _finish_failed(self, db: sqlite3.Connection, job_id: str, error: JobError) -> None:
        db.execute(
            "UPDATE jobs SET status = 'failed', finished_at = ?, error_code = ?, "
            "error_message = ? WHERE id = ?",
            (time.time(), error.code, error.message, job_id),
        )
        self._emit(db, job_id, EventType.FAILED, {"code": error.code, "message": error.message})

    def _finish_canceled(self, db: sqlite3.Connection, job_id: str, during: str) -> None:
        db.execute(
            "UPDATE jobs SET status = 'canceled', finished_at = ? WHERE id = ?",
            (time.time(), job_id),
        )
        self._emit(db, job_id, EventType.CANCELED, {"while": during})

    def cancel(self, job_id: str) -> Job:
        with self._write() as db:
            row = self._row(db, job_id)
            status = JobStatus(row["status"])
            if status is JobStatus.QUEUED:
                self._finish_canceled(db, job_id, "queued")
            elif status is JobStatus.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._job(db, self._row(db, job_id))

    def cancel_requested(self, job_id: str) -> bool:
        row = (
            self._connection()
            .execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return bool(row and row[0])

    def mark_canceled(self, job_id: str, worker_id: str) -> bool:
        with self._write() as db:
            if self._held(db, job_id, worker_id) is None:
                return False
            self._finish_canceled(db, job_id, "running")
            return True

    def get(self, job_id: str) -> Job:
        db = self._connection()
        return self._job(db, self._row(db, job_id), position=True)

    def find(self, idempotency_key: str) -> Job | None:
        db = self._connection()
        row = db.execute(
            "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        return self._job(db, row, position=True) if row is not None else None

    def list(
        self,
        *,
        status: JobStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        clauses: builtins.list[str] = ["1 = 1"]
        values: builtins.list[str | int] = []
        if status is not None:
            clauses.append("status = ?")
            values.append(status.value)
        if owner is not None:
            clauses.append("owner = ?")
            values.append(owner)
        if cursor:
            clauses.append("seq < ?")
            # SQLite integers are 64-bit: a larger cursor means "from the newest".
            values.append(min(int(cursor), _SQLITE_INT_MAX) if cursor.isdigit() else 0)
        db = self._connection()
        rows = db.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
            (*values, limit + 1),
        ).fetchall()
        page = rows[:limit]
        next_cursor = str(page[-1]["seq"]) if len(rows) > limit else None
        return [self._job(db, row) for row in page], next_cursor

    def events(self, job_id: str, after_id: int = 0) -> builtins.list[JobEvent]:
        rows = (
            self._connection()
            .execute(
                "SELECT * FROM events WHERE job_id = ? AND id > ? ORDER BY id", (job_id, after_id)
            )
            .fetchall()
        )
        return [
            JobEvent(
                id=row["id"],
                job_id=row["job_id"],
                type=EventType(row["type"]),
                data=json.loads(row["data"]),
                created_at=timestamp(row["created_at"]),
            )
            for row in rows
        ]

    def wait_for_events(
        self, job_id: str, after_id: int = 0, timeout_s: float = 1.0
    ) -> builtins.list[JobEvent]:
        """SQLite has no push: poll briefly until an event arrives or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events(job_id, after_id)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(min(EVENT_POLL_S, max(deadline - time.monotonic(), 0)))

    def reclaim(self, *, stale_after_s: float, worker_id: str | None = None) -> builtins.list[str]:
        with self._write() as db:
            if worker_id is not None:
                rows = db.execute(
                    "SELECT id, attempts, cancel_requested FROM jobs "
                    "WHERE status = 'running' AND worker_id = ?",
                    (worker_id,),
                ).fetchall()
            else:
                rows = db.execute(
                    "SELECT id, attempts, cancel_requested FROM jobs "
                    "WHERE status = 'running' AND heartbeat_at < ?",
                    (time.time() - stale_after_s,),
                ).fetchall()
            for row in rows:
                if row["cancel_requested"]:  # asked to stop anyway: do not run it again
                    self._finish_canceled(db, row["id"], "worker_lost")
                elif row["attempts"] < self._max_attempts:
                    self._requeue(db, row["id"], reason="worker_lost")
                else:
                    message = (
                        f"the worker running this job stopped {row['attempts']} times "
                        "(crash, out of memory or killed); not retrying"
                    )
                    self._finish_failed(
                        db, row["id"], JobError(code="worker_lost", message=message)
                    )
            return [row["id"] for row in rows]

    def record_webhook_attempt(self, job_id: str, attempt: WebhookAttempt) -> None:
        with self._write() as db:
            self._row(db, job_id)
            db.execute(
                "INSERT INTO webhook_attempts (job_id, attempt) VALUES (?, ?)",
                (job_id, attempt.model_dump_json()),
            )

    def stats(self) -> BrokerStats:
        db = self._connection()
        stats = BrokerStats(queued={priority.value: 0 for priority in Priority})
        for row in db.execute(
            "SELECT status, priority, COUNT(*) AS n FROM jobs GROUP BY status, priority"
        ):
            status = JobStatus(row["status"])
            if status is JobStatus.QUEUED:
                stats.queued[PRIORITY_BY_RANK[row["priority"]].value] = row["n"]
            elif status is JobStatus.RUNNING:
                stats.running += row["n"]
            else:
                stats.finished[status.value] = stats.finished.get(status.value, 0) + row["n"]
        for row in db.execute(
            "SELECT error_code, COUNT(*) AS n FROM jobs WHERE error_code IS NOT NULL "
            "GROUP BY error_code"
        ):
            stats.errors_by_code[row["error_code"]] = row["n"]
        buckets = ", ".join(f"SUM(duration_s <= {bound})" for bound in DURATION_BUCKETS_S)
        row = db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(duration_s), 0), {buckets} FROM jobs "
            "WHERE duration_s IS NOT NULL"
        ).fetchone()
        stats.duration_count, stats.duration_sum_s = row[0], row[1]
        stats.duration_buckets = {
            str(bound): int(row[2 + i] or 0) for i, bound in enumerate(DURATION_BUCKETS_S)
        }
        stats.workers = self.workers()
        return stats

    def workers(self) -> builtins.list[WorkerInfo]:
        return [
            WorkerInfo.model_validate_json(info)
            for (info,) in self._connection().execute("SELECT info FROM workers ORDER BY id")
        ]
