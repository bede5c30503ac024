"""The scale-out broker on Redis (>= 6.2; TLS `rediss://` and auth URLs work).

- One stream per priority with a consumer group `workers`; a claim reads the streams
  with XREADGROUP highest priority first, and the entry stays pending until the job
  ends (XACK on complete, fail or cancel).
- Model affinity: a claim that takes a job from behind the head of its stream (a model
  the worker has loaded) moves its entry to the `PREFIX:stream:affinity` stream and reads
  it from there, so it is pending like any other (see redis_scripts.CLAIM). The job hash
  keeps its priority stream in `stream` (requeues go back there) and the stream its
  entry lives in, when another, in `entry_stream`.
- A worker's heartbeat re-claims its pending entry (XCLAIM ... JUSTID), which resets the
  entry's idle time; reclaim finds entries idle longer than the timeout with XAUTOCLAIM,
  i.e. jobs whose worker stopped heartbeating, and puts them back in their stream, or
  after max_attempts deliveries into the dead-letter stream `PREFIX:dead`, failed.
- Job state in hashes (expiring `job_ttl_s` after the job ends), events in a stream per
  job carrying ids from one counter (SSE `Last-Event-ID` resumes; XREAD BLOCK delivers
  live), idempotency keys, a worker registry, counters for stats. Every transition runs
  as one Lua script.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

import redis
from ulid import ULID

from sdworker.broker import redis_scripts
from sdworker.broker.base import (
    DEFAULT_MAX_ATTEMPTS,
    DURATION_BUCKETS_S,
    BrokerStats,
    WorkerInfo,
)
from sdworker.broker.records import (
    WORKER_RETENTION_S,
    job_from_record,
    model_key,
    spec_digest,
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

GROUP = "workers"
PRIORITY_ORDER = (Priority.URGENT, Priority.HIGH, Priority.NORMAL, Priority.LOW)
# Where jobs taken out of order for model affinity are delivered from (not a priority).
AFFINITY_STREAM = "affinity"
# How many entries behind the head of a priority an affinity claim looks at: the claim
# runs in one script, and a long queue must not make every claim walk all of it.
AFFINITY_SCAN = 64
# Every stream the consumer group reads: created at start, swept by reclaim.
_STREAMS = (*(priority.value for priority in PRIORITY_ORDER), AFFINITY_STREAM)
# The hash fields a job record has (absent ones read as None).
_RECORD_FIELDS = (
    "id", "status", "spec", "priority", "owner", "attempts", "worker_id", "step",
    "total_steps", "created_at", "started_at", "finished_at", "result", "error_code",
    "error_message",
)  # fmt: skip


class RedisBroker:
    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sdworker",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        job_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        # Typed as Any: redis-py's stubs mix its sync and async return types.
        self._redis: Any = redis.Redis.from_url(url, decode_responses=True)
        self._p = prefix
        self._max_attempts = max_attempts
        self._ttl = job_ttl_s
        self._scripts: dict[str, Any] = {
            name: self._redis.register_script(getattr(redis_scripts, name))
            for name in (
                "ENQUEUE", "CLAIM", "PROGRESS", "COMPLETE", "FAIL", "CANCEL",
                "MARK_CANCELED", "RECLAIM_ONE",
            )
        }  # fmt: skip
        for name in _STREAMS:
            try:
                self._redis.xgroup_create(self._stream(name), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:  # BUSYGROUP: made by another process
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- helpers -----------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self._p, *parts))

    def _stream(self, priority: str) -> str:
        return self._key("stream", priority)

    def _run(self, name: str, *args: str | int | float) -> Any:
        return self._scripts[name](keys=[], args=[self._p, *args])

    def _job(self, data: dict[str, str]) -> Job:
        fields = {name: data.get(name) for name in _RECORD_FIELDS}
        attempts = [
            WebhookAttempt.model_validate_json(raw)
            for raw in self._redis.lrange(self._key("webhooks", data["id"]), 0, -1)
        ]
        job = job_from_record(fields, attempts)
        if job.status is JobStatus.QUEUED:
            rank = self._redis.zrank(self._key("queued"), job.id)
            job.queue_position = None if rank is None else int(rank) + 1
        return job

    def _load(self, job_id: str) -> dict[str, str]:
        data: dict[str, str] = self._redis.hgetall(self._key("job", job_id))
        if not data:
            raise JobNotFoundError(f"no job with id {job_id!r}", field="id")
        return data

    # -- the contract ------------------------------------------------------------------

    def enqueue(self, spec: JobSpec, *, idempotency_key: str | None = None) -> tuple[Job, bool]:
        job_id, created = self._run(
            "ENQUEUE", str(ULID()), spec.model_dump_json(), spec_digest(spec),
            idempotency_key or "", spec.priority.rank, spec.priority.value, owner_of(spec),
            time.time(), batch_key_of(spec) or "", spec.num_images, model_key(spec),
        )  # fmt: skip
        if int(created) == -1:
            raise JobConflictError(
                f"Idempotency-Key {idempotency_key!r} was used for job {job_id} with a "
                "different request body",
                field="Idempotency-Key",
            )
        return self.get(job_id), bool(int(created))

    def claim(
        self,
        worker_id: str,
        *,
        batch_key: str | None = None,
        max_images: int | None = None,
        prefer_models: Collection[str] = (),
        affinity_wait_s: float = 0.0,
    ) -> Job | None:
        if batch_key == "":
            return None  # the key of jobs that never join a batch
        streams = [priority.value for priority in PRIORITY_ORDER]
        limit = -1 if max_images is None else max_images
        preferred = sorted(set(prefer_models)) if batch_key is None else []
        wait_ms = round(min(max(affinity_wait_s, 0.0), 1e9) * 1000)
        job_id = self._run(
            "CLAIM", worker_id, time.time(), batch_key or "", limit, json.dumps(preferred),
            wait_ms, AFFINITY_SCAN, AFFINITY_STREAM, *streams,
        )  # fmt: skip
        return self.get(job_id) if job_id else None

    def heartbeat(self, info: WorkerInfo) -> None:
        now = time.time()
        seen = info.model_copy(update={"last_seen": datetime.fromtimestamp(now, UTC)})
        pipe = self._redis.pipeline()
        pipe.hset(self._key("workers"), info.id, seen.model_dump_json())
        for job_id in info.jobs_held():
            # Only the jobs the worker says it holds: a claim whose reply never reached
            # the worker goes idle and is reclaimed instead of being kept alive.
            job = self._key("job", job_id)
            owner, status, stream, entry_stream, entry = self._redis.hmget(
                job, "worker_id", "status", "stream", "entry_stream", "entry"
            )
            # The entry lives in its priority stream unless an affinity claim moved it.
            stream = entry_stream or stream
            if owner == info.id and status == "running" and stream and entry:
                pipe.hset(job, "heartbeat_at", now)
                # Re-claiming resets the entry's idle time: XAUTOCLAIM leaves it alone.
                pipe.xclaim(self._stream(stream), GROUP, info.id, 0, [entry], justid=True)
        pipe.execute()
        self._prune_workers(now)

    def _prune_workers(self, now: float) -> None:
        for worker_id, raw in self._redis.hgetall(self._key("workers")).items():
            last = WorkerInfo.model_validate_json(raw).last_seen
            if last is not None and now - last.timestamp() > WORKER_RETENTION_S:
                self._redis.hdel(self._key("workers"), worker_id)

    def progress(self, job_id: str, worker_id: str, step: int, total_steps: int) -> None:
        percent = JobProgress(step=step, total_steps=total_steps).percent
        self._run("PROGRESS", job_id, worker_id, step, total_steps, percent, time.time())

    def complete(self, job_id: str, worker_id: str, result: JobResult) -> bool:
        data = {
            "assets": [
                asset.model_dump(mode="json", exclude={"base64"}) for asset in result.assets
            ],
            "seeds": result.seeds,
        }
        done = self._run(
            "COMPLETE", job_id, worker_id, result.model_dump_json(), result.timings.total_s,
            json.dumps(data), time.time(), self._ttl, *DURATION_BUCKETS_S,
        )  # fmt: skip
        return bool(done)

    def fail(
        self, job_id: str, worker_id: str, error: JobError, *, retryable: bool = False
    ) -> bool:
        done = self._run(
            "FAIL", job_id, worker_id, error.code, error.message, int(retryable),
            self._max_attempts, time.time(), self._ttl,
        )  # fmt: skip
        return bool(done)

    def cancel(self, job_id: str) -> Job:
        if int(self._run("CANCEL", job_id, time.time(), self._ttl)) == -1:
            raise JobNotFoundError(f"no job with id {job_id!r}", field="id")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self._redis.hget(self._key("job", job_id), "cancel_requested") == "1")

    def mark_canceled(self, job_id: str, worker_id: str) -> bool:
        return bool(self._run("MARK_CANCELED", job_id, worker_id, time.time(), self._ttl))

    def get(self, job_id: str) -> Job:
        return self._job(self._load(job_id))

    def find(self, idempotency_key: str) -> Job | None:
        job_id = self._redis.get(self._key("idem", idempotency_key))
        if job_id is None:
            return None
        try:
            return self.get(job_id.decode() if isinstance(job_id, bytes) else str(job_id))
        except JobNotFoundError:  # expired between the two reads
            return None

    def list(
        self,
        *,
        status: JobStatus | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]:
        index = self._key("owner", owner) if owner is not None else self._key("jobs")
        upper: str = f"({int(cursor)}" if cursor and cursor.isdigit() else "+inf"
        page: builtins.list[Job] = []
        while len(page) <= limit:
            batch = self._redis.zrevrangebyscore(
                index, upper, "-inf", start=0, num=200, withscores=True
            )
            if not batch:
                break
            for job_id, seq in batch:
                upper = f"({int(seq)}"
                data = self._redis.hgetall(self._key("job", job_id))
                if not data:  # expired after its TTL
                    self._redis.zrem(index, job_id)
                    continue
                if status is None or data["status"] == status.value:
                    page.append(self._job(data))
                    if len(page) > limit:
                        break
        next_cursor = None
        if len(page) > limit:
            page = page[:limit]
            seq = self._redis.hget(self._key("job", page[-1].id), "seq")
            next_cursor = str(seq)
        return page, next_cursor

    def events(self, job_id: str, after_id: int = 0) -> builtins.list[JobEvent]:
        entries = self._redis.xrange(self._key("events", job_id))
        return [event for _, event in self._parse(job_id, entries) if event.id > after_id]

    def wait_for_events(
        self, job_id: str, after_id: int = 0, timeout_s: float = 1.0
    ) -> builtins.list[JobEvent]:
        """Like events(), but blocks on the job's stream (XREAD BLOCK) until one arrives."""
        key = self._key("events", job_id)
        parsed = self._parse(job_id, self._redis.xrange(key))
        newer = [event for _, event in parsed if event.id > after_id]
        if newer:
            return newer
        last = parsed[-1][0] if parsed else "0-0"
        reply = self._redis.xread({key: last}, block=max(int(timeout_s * 1000), 1))
        entries = reply[0][1] if reply else []
        return [event for _, event in self._parse(job_id, entries) if event.id > after_id]

    @staticmethod
    def _parse(job_id: str, entries: Any) -> builtins.list[tuple[str, JobEvent]]:
        return [
            (
                stream_id,
                JobEvent(
                    id=int(fields["id"]),
                    job_id=job_id,
                    type=EventType(fields["type"]),
                    data=json.loads(fields["data"]),
                    created_at=datetime.fromtimestamp(float(fields["created_at"]), UTC),
                ),
            )
            for stream_id, fields in entries
        ]

    def reclaim(self, *, stale_after_s: float, worker_id: str | None = None) -> builtins.list[str]:
        now = time.time()
        if worker_id is not None:
            candidates = builtins.list(self._redis.smembers(self._key("running")))
            stale_before = ""
        else:
            candidates = self._idle_entries(stale_after_s)
            stale_before = str(now - stale_after_s)
        reclaimed = []
        for job_id in candidates:
            done = self._run(
                "RECLAIM_ONE", job_id, worker_id or "", stale_before, self._max_attempts,
                now, self._ttl,
            )  # fmt: skip
            if done:
                reclaimed.append(job_id)
        return reclaimed

    def _idle_entries(self, stale_after_s: float) -> builtins.list[str]:
        """Jobs of stream entries pending longer than the timeout (XAUTOCLAIM)."""
        jobs: builtins.list[str] = []
        idle_ms = max(int(stale_after_s * 1000), 1)
        for name in _STREAMS:
            start = "0-0"
            while True:
                reply = self._redis.xautoclaim(
                    self._stream(name), GROUP, "reclaimer", idle_ms, start, count=100
                )
                start, entries = reply[0], reply[1]
                jobs.extend(fields["job"] for _, fields in entries if fields)
                if start == "0-0" or not entries:
                    break
        return jobs

    def record_webhook_attempt(self, job_id: str, attempt: WebhookAttempt) -> None:
        self._load(job_id)
        key = self._key("webhooks", job_id)
        pipe = self._redis.pipeline()
        pipe.rpush(key, attempt.model_dump_json())
        if self._ttl:
            pipe.expire(key, self._ttl)
        pipe.execute()

    def stats(self) -> BrokerStats:
        stats = BrokerStats(queued={})
        queued = self._key("queued")
        for priority in Priority:
            low = (3 - priority.rank) * 10**13
            stats.queued[priority.value] = int(self._redis.zcount(queued, low, f"({low + 10**13}"))
        stats.running = int(self._redis.scard(self._key("running")))
        finished = self._redis.hgetall(self._key("stats", "finished"))
        stats.finished = {k: int(v) for k, v in finished.items()}
        errors = self._redis.hgetall(self._key("stats", "errors"))
        stats.errors_by_code = {k: int(v) for k, v in errors.items()}
        durations: dict[str, str] = self._redis.hgetall(self._key("stats", "duration"))
        stats.duration_count = int(durations.get("count", 0))
        stats.duration_sum_s = float(durations.get("sum", 0.0))
        stats.duration_buckets = {
            str(bound): int(durations.get(str(bound), 0)) for bound in DURATION_BUCKETS_S
        }
        stats.workers = self.workers()
        return stats

    def workers(self) -> builtins.list[WorkerInfo]:
        workers = self._redis.hgetall(self._key("workers")).values()
        return sorted((WorkerInfo.model_validate_json(raw) for raw in workers), key=lambda w: w.id)

    def close(self) -> None:
        self._redis.close()
