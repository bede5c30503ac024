"""Fault injection on the Redis broker with real processes: real redis-server (AOF,
appendfsync always), real `Worker` processes (tests/integration/fault_worker.py, a fake
engine), real LocalStorage. Workers are SIGKILLed, a job kills every worker that takes
it, Redis itself is SIGKILLed and restarted on the same folder and port.

Each test has its own key prefix and data folder, a 0.2 s heartbeat and a 1.5 s
heartbeat timeout; every process a test starts is killed at its teardown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sdworker.broker.redis import PRIORITY_ORDER, RedisBroker
from sdworker.jobs import EventType, Job, JobSpec, JobStatus, owner_of
from tests.redis_server import RedisServer

WORKER_SCRIPT = Path(__file__).with_name("fault_worker.py")
REPO = Path(__file__).resolve().parents[2]
HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_TIMEOUT_S = 1.5
MAX_ATTEMPTS = 3
STEP_S = 0.02
OWNER = "fault"
ASSET_SET = ["0.png", "0.thumb.webp"]


def spec(prompt: str = "a lighthouse", steps: int = 4, step_s: float = STEP_S) -> JobSpec:
    return JobSpec(
        prompt=prompt, size="64x64", steps=steps, seed=1,
        metadata={"user_id": OWNER, "step_s": step_s},
    )  # fmt: skip


class Cluster:
    """Worker processes on one Redis prefix and data folder, and a broker to watch them."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.prefix = f"fault-{uuid.uuid4().hex[:12]}"
        self.data_dir = root / "data"
        self.log_dir = root / "logs"
        self.log_dir.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.exits: dict[str, int] = {}  # worker id -> exit status, once it has ended
        self._logs: list[Any] = []
        self._count = 0
        self.broker = RedisBroker(url, prefix=self.prefix, max_attempts=MAX_ATTEMPTS)
        self.redis: Any = redis.Redis.from_url(url, decode_responses=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDWORKER_")}
        env.update(
            SDWORKER_BROKER=self.url,
            SDWORKER_REDIS_PREFIX=self.prefix,
            SDWORKER_DATA_DIR=str(self.data_dir),
            SDWORKER_HEARTBEAT_INTERVAL_S=str(HEARTBEAT_INTERVAL_S),
            SDWORKER_HEARTBEAT_TIMEOUT_S=str(HEARTBEAT_TIMEOUT_S),
            SDWORKER_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            SDWORKER_POLL_INTERVAL_S="0.05",
            FAULT_STEP_S=str(STEP_S),
        )
        return env

    # -- processes -----------------------------------------------------------------------

    def start_worker(self) -> str:
        self._count += 1
        worker_id = f"w{self._count}"
        log = (self.log_dir / f"{worker_id}.log").open("wb")
        self._logs.append(log)
        self.procs[worker_id] = subprocess.Popen(
            [sys.executable, str(WORKER_SCRIPT), worker_id, "--parent-pid", str(os.getpid())],
            cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        return worker_id

    def start_workers(self, count: int, timeout: float = 60) -> list[str]:
        ids = [self.start_worker() for _ in range(count)]
        self.wait_ready(ids, timeout)
        return ids

    def alive(self) -> list[str]:
        return [wid for wid, proc in self.procs.items() if proc.poll() is None]

    def reap(self) -> dict[str, int]:
        """Exit statuses of workers that ended since the last call."""
        ended = {
            wid: proc.returncode
            for wid, proc in self.procs.items()
            if wid not in self.exits and proc.poll() is not None
        }
        self.exits.update(ended)
        return ended

    def supervise(self) -> dict[str, int]:
        """What a supervisor does: a fresh worker (new id) for each one that died."""
        ended = self.reap()
        for _ in ended:
            self.start_worker()
        return ended

    def kill(self, worker_id: str) -> None:
        self.procs[worker_id].send_signal(signal.SIGKILL)
        self.procs[worker_id].wait()

    def wait_ready(self, ids: list[str], timeout: float = 60) -> None:
        def ready() -> bool:
            for wid in ids:
                if self.procs[wid].poll() is not None:
                    raise AssertionError(f"worker {wid} exited while starting\n{self.logs()}")
            loaded = {w.id for w in self.broker.stats().workers if w.model_loaded}
            return set(ids) <= loaded

        self.wait(ready, timeout, f"workers {ids} ready")

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for log in self._logs:
            log.close()
        self.broker.close()
        self.redis.close()

    # -- observing -----------------------------------------------------------------------

    def logs(self, limit: int = 4000) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last {limit} chars) ---\n{text[-limit:]}")
        return "\n".join(parts)

    def wait(
        self,
        condition: Callable[[], bool],
        timeout: float,
        what: str,
        tick: Callable[[], object] | None = None,
    ) -> None:
        """Poll until condition() holds; Redis being down only means "not yet"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tick is not None:
                tick()
            try:
                if condition():
                    return
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")

    def enqueue(self, job_spec: JobSpec) -> str:
        return self.broker.enqueue(job_spec)[0].id

    def jobs(self, ids: list[str]) -> list[Job]:
        return [self.broker.get(job_id) for job_id in ids]

    def all_finished(self, ids: list[str]) -> bool:
        finished = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED}
        return all(job.status in finished for job in self.jobs(ids))

    def count(self, job_id: str, kind: EventType) -> int:
        return sum(event.type is kind for event in self.broker.events(job_id))

    def asset_files(self, job: Job) -> list[str]:
        folder = self.data_dir / "assets" / owner_of(job.spec) / job.id
        return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []

    def asset_folders(self) -> set[str]:
        root = self.data_dir / "assets" / OWNER
        return {path.name for path in root.iterdir()} if root.is_dir() else set()

    def assert_streams_drained(self) -> None:
        """No entry left in any priority stream, none pending in the group."""
        for priority in PRIORITY_ORDER:
            stream = f"{self.prefix}:stream:{priority.value}"
            assert self.redis.xlen(stream) == 0, stream
            assert self.redis.xpending(stream, "workers")["pending"] == 0, stream

    def assert_succeeded_once(self, ids: list[str], attempts: int | None = 1) -> None:
        """Each job succeeded, with one `completed` event and one asset set on disk."""
        problems = []
        for job in self.jobs(ids):
            completed = self.count(job.id, EventType.COMPLETED)
            files = self.asset_files(job)
            if job.status is not JobStatus.SUCCEEDED or completed != 1 or files != ASSET_SET:
                problems.append(
                    f"{job.id}: {job.status} error={job.error} attempts={job.attempts} "
                    f"completed events={completed} files={files}"
                )
            elif attempts is not None and job.attempts != attempts:
                problems.append(f"{job.id}: attempts {job.attempts}, expected {attempts}")
        assert not problems, "\n".join(problems) + "\n" + self.logs()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("fault-redis"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone, to kill and restart on the same folder and port."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[[RedisServer], Cluster]]:
    clusters: list[Cluster] = []

    def make(server: RedisServer) -> Cluster:
        cluster = Cluster(server.url, tmp_path / f"cluster-{len(clusters)}")
        clusters.append(cluster)
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


def test_two_workers_run_fifty_jobs_exactly_once(
    shared_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(shared_redis)
    workers = cluster.start_workers(2)
    ids = [cluster.enqueue(spec(steps=4)) for _ in range(50)]
    cluster.wait(lambda: cluster.all_finished(ids), 60, "50 jobs finished")

    cluster.assert_succeeded_once(ids, attempts=1)
    assert cluster.asset_folders() == set(ids)
    by_worker: dict[str, int] = {}
    for job_id in ids:
        started = [e for e in cluster.broker.events(job_id) if e.type is EventType.STARTED]
        assert len(started) == 1
        by_worker[started[0].data["worker_id"]] = by_worker.get(started[0].data["worker_id"], 0) + 1
    assert set(by_worker) == set(workers) and min(by_worker.values()) > 0, by_worker
    cluster.assert_streams_drained()
    assert cluster.alive() == workers


def test_a_sigkilled_workers_job_is_finished_by_the_other_worker(
    shared_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(shared_redis)
    workers = cluster.start_workers(2)
    job_id = cluster.enqueue(spec(steps=100, step_s=0.03))  # 3 s: the kill lands mid-job
    cluster.wait(lambda: cluster.count(job_id, EventType.PROGRESS) > 0, 20, "first progress")
    holder = cluster.broker.get(job_id).worker_id
    assert holder in workers
    cluster.kill(holder)
    killed_at = time.time()
    (other,) = set(workers) - {holder}

    cluster.wait(lambda: cluster.all_finished([job_id]), 30, "the job finished")
    cluster.assert_succeeded_once([job_id], attempts=2)  # delivered twice, completed once
    events = cluster.broker.events(job_id)
    started = [e.data["worker_id"] for e in events if e.type is EventType.STARTED]
    assert started == [holder, other]
    queued = [e for e in events if e.type is EventType.QUEUED]
    assert [e.data for e in queued] == [{"priority": "normal"}, {"reason": "worker_lost"}]
    # Re-queued only once the dead worker's entry sat idle for the timeout (its last
    # heartbeat or progress report can be up to one interval older than the kill).
    requeued_after = queued[1].created_at.timestamp() - killed_at
    assert HEARTBEAT_TIMEOUT_S - 2 * HEARTBEAT_INTERVAL_S - 0.1 <= requeued_after < 10
    assert cluster.asset_folders() == {job_id}
    assert cluster.broker.get(job_id).result.assets[0].key.endswith(f"{job_id}/0.png")  # type: ignore[union-attr]
    cluster.assert_streams_drained()
    assert cluster.reap() == {holder: -signal.SIGKILL}


def test_a_job_that_always_kills_its_worker_is_dead_lettered(
    shared_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(shared_redis)
    cluster.start_workers(2)
    poison = cluster.enqueue(spec(prompt="kill-me", steps=10))
    others: list[str] = []
    deaths: dict[str, int] = {}
    last_submit = 0.0

    def tick() -> None:
        nonlocal last_submit
        deaths.update(cluster.supervise())  # restart each dead worker, like `serve` does
        if time.monotonic() - last_submit > 0.4:  # other work keeps arriving meanwhile
            others.append(cluster.enqueue(spec(steps=5)))
            last_submit = time.monotonic()

    cluster.wait(lambda: cluster.all_finished([poison]), 60, "the poison job ended", tick=tick)
    cluster.wait(lambda: cluster.all_finished(others), 30, "the other jobs", tick=cluster.supervise)

    job = cluster.broker.get(poison)
    assert job.status is JobStatus.FAILED and job.error is not None
    assert job.error.code == "worker_lost" and job.attempts == MAX_ATTEMPTS
    events = cluster.broker.events(poison)
    assert [e.type for e in events] == [
        EventType.QUEUED, EventType.STARTED, EventType.QUEUED, EventType.STARTED,
        EventType.QUEUED, EventType.STARTED, EventType.FAILED,
    ]  # fmt: skip
    assert [e.data.get("reason") for e in events if e.type is EventType.QUEUED][1:] == [
        "worker_lost",
        "worker_lost",
    ]
    assert events[-1].data["code"] == "worker_lost"
    dead = cluster.redis.xrange(f"{cluster.prefix}:dead")
    assert [fields for _, fields in dead] == [{"job": poison, "attempts": str(MAX_ATTEMPTS)}]
    # Each attempt took exactly one worker down, nothing else did.
    deaths.update(cluster.reap())
    assert list(deaths.values()) == [-signal.SIGKILL] * MAX_ATTEMPTS, deaths
    assert cluster.asset_files(job) == []

    assert len(others) >= 5
    cluster.assert_succeeded_once(others, attempts=1)
    assert cluster.asset_folders() == set(others)
    cluster.assert_streams_drained()


def _restart_redis_mid_run(
    cluster: Cluster, server: RedisServer, *, down_s: float, tick: Callable[[], object] | None
) -> list[str]:
    """20 jobs on 2 workers; once some finished and some run, SIGKILL redis-server, wait
    down_s, start it again on the same folder and port. Returns the job ids."""
    ids = [cluster.enqueue(spec(steps=15)) for _ in range(20)]  # ~0.3 s each

    def mid_run() -> bool:
        stats = cluster.broker.stats()
        return stats.finished.get("succeeded", 0) >= 3 and stats.running >= 1

    cluster.wait(mid_run, 30, "some jobs finished and some running", tick=tick)
    before = cluster.broker.stats()
    assert before.queued["normal"] > 0  # queued and running jobs both meet the restart
    server.kill()
    time.sleep(down_s)
    server.start()
    return ids


def test_no_job_is_lost_when_redis_restarts_under_a_supervisor(
    own_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(own_redis)
    cluster.start_workers(2)
    ids = _restart_redis_mid_run(cluster, own_redis, down_s=1.0, tick=cluster.supervise)
    cluster.wait(
        lambda: cluster.all_finished(ids), 60, "every job finished", tick=cluster.supervise
    )
    # Delivered once or (held by a worker that died with Redis) twice; completed once.
    cluster.assert_succeeded_once(ids, attempts=None)
    assert all(job.attempts <= 2 for job in cluster.jobs(ids))
    assert cluster.asset_folders() == set(ids)
    cluster.assert_streams_drained()


def test_workers_ride_out_a_redis_restart_without_a_supervisor(
    own_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(own_redis)
    workers = cluster.start_workers(2)
    ids = _restart_redis_mid_run(cluster, own_redis, down_s=1.0, tick=None)

    def done() -> bool:
        assert not cluster.reap(), f"a worker died with Redis:\n{cluster.logs()}"
        return cluster.all_finished(ids)

    cluster.wait(done, 30, "every job finished")
    cluster.assert_succeeded_once(ids, attempts=None)
    assert cluster.alive() == workers


def test_a_transient_broker_error_during_a_job_does_not_fail_it(
    shared_redis: RedisServer, make_cluster: Callable[[RedisServer], Cluster]
) -> None:
    cluster = make_cluster(shared_redis)
    cluster.start_workers(1)
    job_id = cluster.enqueue(spec(prompt="broker-blip", steps=10))
    cluster.wait(lambda: cluster.all_finished([job_id]), 30, "the job ended")
    job = cluster.broker.get(job_id)
    assert job.status is JobStatus.SUCCEEDED, f"{job.status}: {job.error}"
