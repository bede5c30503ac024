"""Broker throughput: how many jobs/s the embedded SQLite broker (or, with
`--backend redis`, the Redis broker) moves through enqueue -> claim -> complete when the
engine does nothing (a minimal JobResult), so the figure is the queue's own ceiling.
Prints a table and writes JSON.

Each round pre-enqueues N jobs into a fresh database in a temp dir, then times draining
them with (a) 1 worker process, (b) 4 worker processes (each with its own SqliteBroker
on the same WAL file: the realistic deployment) and (c) 4 threads of one process sharing
one SqliteBroker (a connection per thread). The enqueue rate alone is timed too, and how
it changes with queue depth. Configurations are interleaved over the rounds and medians
reported. After every drain the database is checked: every job succeeded exactly once
(one claim, one `started` and one `completed` event, no refused complete); the script
exits non-zero if not.

With `--backend redis` the same rounds run against a temporary redis-server started for
the run (AOF on with `appendfsync everysec` as deployed, or `--redis-fsync always`; its
folder in a temp dir), each drain on a fresh key prefix, each worker process with its own
RedisBroker; the exactly-once check reads the job hashes, event lists, streams and the
consumer group's pending list. `--redis-url` uses a running server instead.

    python bench/broker_throughput.py [--jobs 2000] [--rounds 3] [--json PATH]
    python bench/broker_throughput.py --backend redis [--redis-fsync always|everysec]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdworker.broker.base import Broker
from sdworker.broker.sqlite import SqliteBroker
from sdworker.jobs import JobResult, JobSpec, JobTimings

TARGET_JOBS_PER_S = 500.0
# Redis: the scale-out backend must move >= 1000 jobs/s with 4 worker processes.
REDIS_TARGET_JOBS_PER_S = 1000.0
REDIS_TARGET_STAGE = "drain (claim+complete), 4 processes"
SPEC = JobSpec(prompt="a lighthouse on a cliff at dusk", size="64x64", steps=2, seed=1)
RESULT = JobResult(assets=[], seeds=[1], model="noop", device="cpu", timings=JobTimings())


class BenchmarkFailure(Exception):
    """The broker lost, duplicated or refused a job: the figures mean nothing."""


@dataclass(frozen=True)
class RedisTarget:
    """One drain's queue on Redis: the server and a key prefix of its own."""

    url: str
    prefix: str


# Where one drain's queue lives: a SQLite file, or a prefix on a Redis server.
Target = Path | RedisTarget


def open_broker(target: Target) -> Broker:
    if isinstance(target, RedisTarget):
        from sdworker.broker.redis import RedisBroker

        return RedisBroker(target.url, prefix=target.prefix)
    return SqliteBroker(target)


class RedisProcess:
    """A temporary redis-server on a free loopback port, AOF on (like tests/redis_server)."""

    def __init__(self, folder: Path, fsync: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server)")
        folder.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder),
             "--appendonly", "yes", "--appendfsync", fsync, "--save", "",
             "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit(f"redis-server did not start on port {self.port}")

    def version(self) -> str:
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _drain(broker: Broker, worker_id: str) -> dict[str, Any]:
    """Claim and complete until the queue is empty; the no-op engine's worker loop."""
    done = refused = 0
    claim_s = complete_s = 0.0
    while True:
        t0 = time.perf_counter()
        job = broker.claim(worker_id)
        t1 = time.perf_counter()
        claim_s += t1 - t0
        if job is None:
            break
        if broker.complete(job.id, worker_id, RESULT):
            done += 1
        else:
            refused += 1
        complete_s += time.perf_counter() - t1
    return {"worker_id": worker_id, "done": done, "refused": refused,
            "claim_s": claim_s, "complete_s": complete_s}  # fmt: skip


def _process_worker(
    target: Target, worker_id: str, ready: Any, go: Any, results: Any
) -> None:  # pragma: no cover - runs in a child process
    broker = open_broker(target)  # its own broker and connection, like a real worker
    ready.wait()
    go.wait()
    started = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes on Linux
    report = _drain(broker, worker_id)
    report.update(started=started, finished=time.monotonic(), pid=os.getpid())
    broker.close()
    results.put(report)


def drain_with_processes(
    target: Target, workers: int, ctx: Any
) -> tuple[float, list[dict[str, Any]]]:
    ready = ctx.Barrier(workers + 1)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_process_worker, args=(target, f"proc-{i}", ready, go, results))
        for i in range(workers)
    ]
    for proc in procs:
        proc.start()
    ready.wait()  # every child imported sdworker and opened its broker: start is fair
    started = time.monotonic()
    go.set()
    reports = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        if proc.exitcode != 0:
            raise BenchmarkFailure(f"worker process {proc.pid} exited with {proc.exitcode}")
    finished = max(report["finished"] for report in reports)
    return finished - started, reports


def drain_with_threads(target: Target, workers: int) -> tuple[float, list[dict[str, Any]]]:
    broker = open_broker(target)
    reports: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    go = threading.Event()

    def body(i: int) -> None:
        go.wait()
        try:
            reports.append(_drain(broker, f"thread-{i}"))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    broker.close()
    if errors:
        raise BenchmarkFailure(f"a worker thread failed: {errors[0]!r}") from errors[0]
    return elapsed, reports


def enqueue(target: Target, jobs: int) -> tuple[float, list[float]]:
    """Enqueue jobs one by one (one transaction each, as the API does); returns the total
    time and the rate of each tenth of the run (to see the effect of queue depth)."""
    broker = open_broker(target)
    tenth = max(jobs // 10, 1)
    rates: list[float] = []
    started = mark = time.perf_counter()
    for i in range(1, jobs + 1):
        broker.enqueue(SPEC)
        if i % tenth == 0:
            now = time.perf_counter()
            rates.append(tenth / (now - mark))
            mark = now
    elapsed = time.perf_counter() - started
    broker.close()
    return elapsed, rates


def depth_probe(folder: Path, depths: list[int]) -> list[dict[str, float]]:
    """Cost of one enqueue with `depth` jobs already queued, and of stats() (behind
    /health, /status and /metrics) with `depth` finished jobs in the table. The rows are
    bulk-inserted with SQL (same columns the broker writes) to build deep tables fast."""
    spec_json = SPEC.model_dump_json()
    rows = []
    for depth in depths:
        out: dict[str, float] = {"depth": depth}
        for status, key in (("queued", "enqueue_ms"), ("succeeded", "stats_ms")):
            path = folder / f"depth-{depth}-{status}.db"
            broker = SqliteBroker(path)
            with sqlite3.connect(path) as db:
                db.executemany(
                    "INSERT INTO jobs (id, status, priority, owner, spec, spec_hash, created_at, "
                    "duration_s) VALUES (?, ?, 1, 'anonymous', ?, 'h', ?, ?)",
                    (
                        (f"bulk-{i}", status, spec_json, time.time(),
                         1.0 if status == "succeeded" else None)
                        for i in range(depth)
                    ),
                )  # fmt: skip
            samples = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(20):
                    broker.enqueue(SPEC) if status == "queued" else broker.stats()
                samples.append(1e3 * (time.perf_counter() - started) / 20)
            out[key] = statistics.median(samples)
            broker.close()
        rows.append(out)
    return rows


def verify(target: Target, jobs: int, reports: list[dict[str, Any]]) -> None:
    """Every job succeeded exactly once; raise BenchmarkFailure with the evidence if not."""
    if isinstance(target, RedisTarget):
        verify_redis(target, jobs, reports)
        return
    path = target
    db = sqlite3.connect(path)
    try:
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        attempts = dict(db.execute("SELECT attempts, COUNT(*) FROM jobs GROUP BY attempts"))
        events = dict(db.execute("SELECT type, COUNT(*) FROM events GROUP BY type"))
        per_job = db.execute(
            "SELECT COUNT(*) FROM (SELECT job_id FROM events WHERE type = 'completed' "
            "GROUP BY job_id HAVING COUNT(*) = 1)"
        ).fetchone()[0]
    finally:
        db.close()
    done = sum(report["done"] for report in reports)
    refused = sum(report["refused"] for report in reports)
    problems = []
    if statuses != {"succeeded": jobs}:
        problems.append(f"job statuses {statuses}, expected {{'succeeded': {jobs}}}")
    if attempts != {1: jobs}:
        problems.append(f"attempts {attempts}, expected every job claimed once")
    expected_events = {"queued": jobs, "started": jobs, "completed": jobs}
    if events != expected_events:
        problems.append(f"events {events}, expected {expected_events}")
    if per_job != jobs:
        problems.append(f"{per_job} jobs have exactly one completed event, expected {jobs}")
    if done != jobs or refused:
        problems.append(f"workers completed {done} (refused {refused}), expected {jobs}")
    if problems:
        raise BenchmarkFailure(f"{path}: " + "; ".join(problems))


def verify_redis(target: RedisTarget, jobs: int, reports: list[dict[str, Any]]) -> None:
    """verify() on Redis, through the broker (list, events, stats), plus the streams: no
    entry left in any priority stream and none pending in the consumer group."""
    import redis

    from sdworker.broker.redis import GROUP, PRIORITY_ORDER, RedisBroker

    broker = RedisBroker(target.url, prefix=target.prefix)
    client: Any = redis.Redis.from_url(target.url, decode_responses=True)
    statuses: dict[str, int] = {}
    attempts: dict[int, int] = {}
    events: dict[str, int] = {}
    per_job = 0
    try:
        listed, cursor = broker.list(limit=jobs + 1)
        if cursor is not None:
            raise BenchmarkFailure(f"more than {jobs} jobs under prefix {target.prefix}")
        for job in listed:
            statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
            attempts[job.attempts] = attempts.get(job.attempts, 0) + 1
            kinds = [event.type.value for event in broker.events(job.id)]
            for kind in kinds:
                events[kind] = events.get(kind, 0) + 1
            per_job += kinds.count("completed") == 1
        stats = broker.stats()
        leftovers = {
            priority.value: (
                client.xlen(f"{target.prefix}:stream:{priority.value}"),
                client.xpending(f"{target.prefix}:stream:{priority.value}", GROUP)["pending"],
            )
            for priority in PRIORITY_ORDER
        }
    finally:
        broker.close()
        client.close()
    done = sum(report["done"] for report in reports)
    refused = sum(report["refused"] for report in reports)
    problems = []
    if statuses != {"succeeded": jobs}:
        problems.append(f"job statuses {statuses}, expected {{'succeeded': {jobs}}}")
    if attempts != {1: jobs}:
        problems.append(f"attempts {attempts}, expected every job claimed once")
    expected_events = {"queued": jobs, "started": jobs, "completed": jobs}
    if events != expected_events:
        problems.append(f"events {events}, expected {expected_events}")
    if per_job != jobs:
        problems.append(f"{per_job} jobs have exactly one completed event, expected {jobs}")
    if done != jobs or refused:
        problems.append(f"workers completed {done} (refused {refused}), expected {jobs}")
    if any(entries or pending for entries, pending in leftovers.values()):
        problems.append(f"stream entries / pending left per priority: {leftovers}")
    if stats.running or any(stats.queued.values()) or stats.finished != {"succeeded": jobs}:
        problems.append(
            f"stats: running {stats.running}, queued {stats.queued}, finished {stats.finished}"
        )
    if problems:
        raise BenchmarkFailure(f"redis prefix {target.prefix}: " + "; ".join(problems))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per drain")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the results [default: bench/results/broker_throughput.json, "
        "or broker_throughput_redis.json with --backend redis]",
    )
    parser.add_argument("--backend", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument(
        "--redis-fsync",
        choices=["always", "everysec"],
        default="everysec",
        help="appendfsync of the temporary redis-server, AOF on either way [default: "
        "everysec, as deploy/docker-compose.yml runs it; tests/redis_server.py uses always]",
    )
    parser.add_argument(
        "--redis-url", default=None, help="use this running Redis instead of a temporary one"
    )
    parser.add_argument(
        "--depth-probe",
        action="store_true",
        help="instead: time one enqueue at growing queue depth and stats() at growing "
        "table size (writes bench/results/broker_depth_probe.json)",
    )
    args = parser.parse_args()
    if args.json is None:
        suffix = "" if args.backend == "sqlite" else "_redis"
        args.json = Path(f"bench/results/broker_throughput{suffix}.json")
    if args.depth_probe and args.backend != "sqlite":
        parser.error("--depth-probe measures the SQLite broker only")
    if args.depth_probe:
        with tempfile.TemporaryDirectory(prefix="sdworker-broker-bench-") as tmp:
            probe = depth_probe(Path(tmp), [1_000, 10_000, 50_000, 200_000])
        print(f"{'jobs in table':>13} {'enqueue ms (that many queued)':>30} "
              f"{'stats() ms (that many finished)':>32}")  # fmt: skip
        for row in probe:
            print(f"{row['depth']:13,.0f} {row['enqueue_ms']:30.2f} {row['stats_ms']:32.1f}")
        out = args.json.with_name("broker_depth_probe.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"sqlite": sqlite3.sqlite_version, "rows": probe}, indent=2))
        return

    ctx = mp.get_context("spawn")  # fresh interpreters: no connection inherited over fork
    configs = ["1 process", "4 processes", "4 threads, 1 process"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    enqueues: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    server: RedisProcess | None = None
    backend_info = {"backend": args.backend, "sqlite": sqlite3.sqlite_version}
    with tempfile.TemporaryDirectory(prefix="sdworker-broker-bench-") as tmp:
        redis_url = args.redis_url
        if args.backend == "redis" and redis_url is None:
            server = RedisProcess(Path(tmp) / "redis", args.redis_fsync)
            redis_url = server.url
            backend_info.update(redis=server.version(), redis_fsync=args.redis_fsync)
        try:
            _rounds(args, configs, runs, enqueues, ctx, Path(tmp), redis_url)
        finally:
            if server is not None:
                server.stop()

    load_after = os.getloadavg()
    _report(args, configs, runs, enqueues, backend_info, load_before, load_after)


def _rounds(
    args: argparse.Namespace,
    configs: list[str],
    runs: dict[str, list[dict[str, Any]]],
    enqueues: list[dict[str, Any]],
    ctx: Any,
    tmp: Path,
    redis_url: str | None,
) -> None:
    for round_ in range(args.rounds):
        order = configs[round_ % len(configs) :] + configs[: round_ % len(configs)]
        for name in order:  # rotated each round so drift hits every config alike
            label = f"r{round_}-{name.replace(' ', '_').replace(',', '')}"
            target: Target = tmp / f"{label}.db"
            if redis_url is not None:  # a fresh queue: a prefix of its own
                target = RedisTarget(redis_url, f"bench-{uuid.uuid4().hex[:8]}-{label}")
            enqueue_s, tenths = enqueue(target, args.jobs)
            enqueues.append({"jobs_per_s": args.jobs / enqueue_s, "tenths_jobs_per_s": tenths})
            if name == "4 threads, 1 process":
                elapsed, reports = drain_with_threads(target, 4)
            else:
                elapsed, reports = drain_with_processes(target, int(name[0]), ctx)
            verify(target, args.jobs, reports)
            runs[name].append({
                "drain_s": elapsed,
                "jobs_per_s": args.jobs / elapsed,
                "per_worker_done": sorted(report["done"] for report in reports),
                "claim_ms_per_job": 1e3 * sum(r["claim_s"] for r in reports) / args.jobs,
                "complete_ms_per_job": 1e3 * sum(r["complete_s"] for r in reports) / args.jobs,
            })  # fmt: skip
            print(f"  round {round_ + 1} {name:22} {args.jobs / elapsed:8.0f} jobs/s "
                  f"(enqueue {args.jobs / enqueue_s:6.0f} jobs/s)", flush=True)  # fmt: skip


def _report(
    args: argparse.Namespace,
    configs: list[str],
    runs: dict[str, list[dict[str, Any]]],
    enqueues: list[dict[str, Any]],
    backend_info: dict[str, str],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> None:
    if args.backend == "redis":
        target, target_stages = REDIS_TARGET_JOBS_PER_S, [REDIS_TARGET_STAGE]
        store = f"redis={backend_info.get('redis', args.redis_url)}"
        if "redis_fsync" in backend_info:
            store += f" (AOF, appendfsync {backend_info['redis_fsync']})"
        waits = "round trips and Redis server time included"
    else:
        target, target_stages = TARGET_JOBS_PER_S, None
        store = f"sqlite={sqlite3.sqlite_version}"
        waits = "waits for the write lock included"
    rows = []
    enqueue_rate = statistics.median(e["jobs_per_s"] for e in enqueues)
    first = statistics.median(e["tenths_jobs_per_s"][0] for e in enqueues)
    last = statistics.median(e["tenths_jobs_per_s"][-1] for e in enqueues)
    rows.append({"stage": "enqueue alone, 1 process", "jobs_per_s": enqueue_rate})
    for name in configs:
        rows.append({
            "stage": f"drain (claim+complete), {name}",
            "jobs_per_s": statistics.median(run["jobs_per_s"] for run in runs[name]),
            "claim_ms": statistics.median(run["claim_ms_per_job"] for run in runs[name]),
            "complete_ms": statistics.median(run["complete_ms_per_job"] for run in runs[name]),
            "per_worker_done": runs[name][-1]["per_worker_done"],
        })  # fmt: skip
    print()
    scope = "" if target_stages is None else " with 4 processes"
    print(f"jobs={args.jobs} rounds={args.rounds} {store} "
          f"cpus={os.cpu_count()} target>={target:.0f} jobs/s{scope}; medians; "
          f"every job verified succeeded exactly once; load average {load_before[0]:.2f} "
          f"before, {load_after[0]:.2f} after")  # fmt: skip
    print(f"{'stage':44} {'jobs/s':>8} {'claim ms':>9} {'complete ms':>12}  jobs per worker (last)")
    for row in rows:
        extra = (f" {row['claim_ms']:9.3f} {row['complete_ms']:12.3f}  {row['per_worker_done']}"
                 if "claim_ms" in row else "")  # fmt: skip
        print(f"{row['stage']:44} {row['jobs_per_s']:8.0f}{extra}")
    print(
        f"enqueue rate by queue depth: first tenth {first:.0f} jobs/s, last tenth {last:.0f} "
        f"jobs/s (queue {args.jobs - args.jobs // 10}..{args.jobs} deep)"
    )
    print(f"claim/complete ms: summed over workers per job (time inside the call, {waits})")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "jobs": args.jobs, "rounds": args.rounds, **backend_info,
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "machine": platform.machine(),
        "target_jobs_per_s": target, "rows": rows,
        "loadavg_before": load_before, "loadavg_after": load_after,
        "enqueue": {"first_tenth_jobs_per_s": first, "last_tenth_jobs_per_s": last,
                    "runs": enqueues},
        "runs": runs,
    }, indent=2))  # fmt: skip
    slow = [
        row["stage"]
        for row in rows
        if row["jobs_per_s"] < target and (target_stages is None or row["stage"] in target_stages)
    ]
    if slow:
        print(f"below the {target:.0f} jobs/s target: {', '.join(slow)}")


if __name__ == "__main__":
    try:
        main()
    except BenchmarkFailure as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
