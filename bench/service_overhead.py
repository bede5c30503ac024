"""Service overhead: one job end to end over HTTP against the same Engine.run in process.

Starts a real `sdworker serve` (API + SQLite queue + supervised worker process) on a free
port with a temp data dir, waits for /health 200, warms up, then interleaves N repetitions
of (a) POST /v1/jobs and read its SSE stream until the `completed` event, timed by the
client, and (b) Engine.run on the same spec in this process. Reports medians, the ratio
and the difference in ms, and splits the HTTP time with the job's own timings (queue wait
= the worker's claim polling, inference, PNG+thumbnail encode and store; the rest is
submit, SSE polling and HTTP). Once per poll interval (SDWORKER_POLL_INTERVAL_S, used by
both the idle worker and the SSE stream), so the polling cost shows. Prints a table and
writes JSON.

The in-process engine and the server's worker are separate processes on the same CPUs;
they run one after the other, never at once.

    python bench/service_overhead.py [--repeats 7] [--polls 0.2,0.05] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from sdworker.engine.engine import Cancelled, Engine
from sdworker.jobs import JobSpec
from sdworker.settings import Settings

CASES: dict[str, dict[str, Any]] = {
    "256x256 10 steps": {"size": "256x256", "steps": 10},
    "64x64 2 steps": {"size": "64x64", "steps": 2},
}
PROMPT = "a lighthouse on a cliff at dusk"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _children(pid: int) -> set[int]:
    """Direct children of pid, from /proc (the worker runs in its own session, so it is
    not in the server's process group; remember it to be able to kill it by pid)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def _is_ours(pid: int) -> bool:
    """Alive and still an sdworker process (guards against a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
    zombie = stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]
    return b"sdworker" in cmdline and not zombie


class Server:
    """A `sdworker serve` subprocess; stop() always kills it and its worker."""

    def __init__(self, model: str, poll_s: float, data_dir: Path) -> None:
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / "serve.log"
        self.worker_pids: set[int] = set()
        env = dict(os.environ)
        env.update(
            SDWORKER_DATA_DIR=str(data_dir),
            SDWORKER_MODEL=model,
            SDWORKER_POLL_INTERVAL_S=str(poll_s),
            SDWORKER_API_KEYS="",
            SDWORKER_RUN_WORKER="true",
            SDWORKER_DRAIN_TIMEOUT_S="10",
            SDWORKER_BROKER="",  # the embedded SQLite queue, whatever the environment says
            SDWORKER_S3_BUCKET="",  # local storage under the temp data dir
        )
        env.pop("SDWORKER_PROGRESS_INTERVAL_S", None)  # the default (0.25 s)
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sdworker", "serve", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def _track_workers(self, client: httpx.Client | None = None) -> None:
        if self.process.poll() is None:
            self.worker_pids |= _children(self.process.pid)
        if client is not None:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                status = client.get("/status").json()
                self.worker_pids |= {w["pid"] for w in status["workers"] if w.get("pid")}

    def wait_healthy(self, client: httpx.Client, timeout_s: float = 240.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"sdworker serve exited with {self.process.returncode}")
            self._track_workers()
            with contextlib.suppress(httpx.HTTPError):
                if client.get("/health").status_code == 200:
                    self._track_workers(client)
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"sdworker serve not healthy after {timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM (the server drains and stops its worker), then SIGKILL whatever is left,
        server and worker, by pid."""
        self._track_workers()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.worker_pids:
            if _is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while any(_is_ours(pid) for pid in self.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.worker_pids:
            if _is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        left = [pid for pid in self.worker_pids if _is_ours(pid)]
        if left:
            print(f"warning: worker processes still alive after SIGKILL: {left}", file=sys.stderr)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def http_job(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """Submit, follow the SSE stream to `completed`; client-side times in seconds."""
    started = time.perf_counter()
    accepted = client.post("/v1/jobs", json=body)
    accepted.raise_for_status()
    submitted = time.perf_counter()
    job_id = accepted.json()["id"]
    seen: dict[str, float] = {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        stream.raise_for_status()
        for line in stream.iter_lines():
            if not line.startswith("event:"):
                continue
            kind = line.split(":", 1)[1].strip()
            seen.setdefault(kind, time.perf_counter())
            if kind in {"failed", "canceled"}:
                raise RuntimeError(f"job {job_id} {kind}: {client.get(f'/v1/jobs/{job_id}').text}")
            if kind == "completed":
                break
    if "completed" not in seen:
        raise RuntimeError(f"job {job_id}: the event stream ended without `completed`")
    finished = seen["completed"]
    timings = client.get(f"/v1/jobs/{job_id}").json()["result"]["timings"]
    return {
        "total_s": finished - started,
        "submit_s": submitted - started,
        "started_event_s": seen.get("started", finished) - started,
        "server": timings,
    }


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(server: Server, seconds: float) -> dict[str, float]:
    """CPU % of one core the idle server and worker burn (worker claim polling, SSE-less
    API, heartbeats, reclaim) over a quiet window."""
    pids = {"server": server.process.pid, **{f"worker {p}": p for p in server.worker_pids}}
    before = {name: _cpu_s(pid) for name, pid in pids.items() if _is_ours(pid)}
    time.sleep(seconds)
    return {
        name: 100 * (_cpu_s(pids[name]) - used) / seconds
        for name, used in before.items()
        if _is_ours(pids[name])
    }


def engine_job(engine: Engine, spec: JobSpec) -> float:
    started = time.perf_counter()
    result = engine.run(spec)
    elapsed = time.perf_counter() - started
    if isinstance(result, Cancelled):
        raise RuntimeError("in-process run was cancelled")
    return elapsed


def measure(
    server: Server, engine: Engine, repeats: int, idle_s: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows = []
    with httpx.Client(base_url=server.base_url, timeout=120) as client:
        ready_s = server.wait_healthy(client)
        print(f"  serve healthy after {ready_s:.1f}s (port {server.port}, worker pids "
              f"{sorted(server.worker_pids)})", flush=True)  # fmt: skip
        bodies = {name: {"prompt": PROMPT, "seed": 1, **case} for name, case in CASES.items()}
        specs = {name: JobSpec(**body) for name, body in bodies.items()}
        for name in CASES:  # warm-up, both sides
            http_job(client, bodies[name])
            engine_job(engine, specs[name])
        runs: dict[str, dict[str, list[Any]]] = {name: {"http": [], "engine": []} for name in CASES}
        for rep in range(repeats):
            for name in CASES:
                # interleaved, order alternating, so drift and cache effects hit both alike
                if rep % 2 == 0:
                    runs[name]["http"].append(http_job(client, bodies[name]))
                    runs[name]["engine"].append(engine_job(engine, specs[name]))
                else:
                    runs[name]["engine"].append(engine_job(engine, specs[name]))
                    runs[name]["http"].append(http_job(client, bodies[name]))
        server._track_workers(client)
        idle = idle_cpu(server, idle_s)
    for name, run in runs.items():
        http = [r["total_s"] for r in run["http"]]
        http_s, engine_s = statistics.median(http), statistics.median(run["engine"])

        def server_median(key: str, run: dict[str, list[Any]] = run) -> float:
            return statistics.median(r["server"][key] for r in run["http"])

        parts = {
            "submit_s": statistics.median(r["submit_s"] for r in run["http"]),
            "queue_s": server_median("queue_s"),
            "inference_s": server_median("inference_s"),
            "encode_store_s": statistics.median(
                r["server"]["encode_s"] + r["server"]["store_s"] for r in run["http"]
            ),
        }
        rest = statistics.median(
            r["total_s"] - r["server"]["queue_s"] - r["server"]["inference_s"]
            - r["server"]["encode_s"] - r["server"]["store_s"] for r in run["http"]
        )  # fmt: skip
        rows.append({
            "case": name, "http_s": http_s, "engine_s": engine_s, "ratio": http_s / engine_s,
            "diff_ms": 1e3 * (http_s - engine_s), **parts, "rest_s": rest,
            "http_runs": run["http"], "engine_runs": run["engine"],
        })  # fmt: skip
    return rows, idle


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--idle-s", type=float, default=5.0, help="idle CPU window per server")
    parser.add_argument("--polls", default="0.2,0.05", help="SDWORKER_POLL_INTERVAL_S values")
    parser.add_argument("--json", type=Path, default=Path("bench/results/service_overhead.json"))
    args = parser.parse_args()
    polls = [float(value) for value in args.polls.split(",")]

    # A SIGTERM to the benchmark must still run the finally blocks that kill the server.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    engine = Engine(Settings(model=args.model))
    engine.load()
    load_before = os.getloadavg()
    results: dict[float, list[dict[str, Any]]] = {}
    idles: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sdworker-service-bench-") as tmp:
        for poll in polls:
            data_dir = Path(tmp) / f"poll-{poll}"
            data_dir.mkdir()
            server = Server(args.model, poll, data_dir)
            try:
                results[poll], idles[poll] = measure(server, engine, args.repeats, args.idle_s)
            except BaseException:
                print(f"--- sdworker serve log (poll {poll}) ---\n{server.log_tail()}",
                      file=sys.stderr)  # fmt: skip
                raise
            finally:
                server.stop()

    load_after = os.getloadavg()
    print(f"model={args.model} device={engine.device} dtype={engine.dtype} repeats={args.repeats} "
          f"torch threads={torch.get_num_threads()} cpus={os.cpu_count()}; medians; load "
          f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after")  # fmt: skip
    print("in-process Engine.run (this process) and the server's worker process share the "
          "same CPUs, one after the other")  # fmt: skip
    header = (f"{'poll s':>6} {'case':17} {'HTTP ms':>8} {'engine ms':>9} {'ratio':>6} "
              f"{'diff ms':>8} | {'submit':>6} {'queue':>6} {'infer':>6} {'enc+st':>6} "
              f"{'rest':>6}")  # fmt: skip
    print(header)
    for poll, rows in results.items():
        for row in rows:
            print(f"{poll:6.2f} {row['case']:17} {1e3 * row['http_s']:8.0f} "
                  f"{1e3 * row['engine_s']:9.0f} {row['ratio']:6.2f} {row['diff_ms']:8.0f} | "
                  f"{1e3 * row['submit_s']:6.0f} {1e3 * row['queue_s']:6.0f} "
                  f"{1e3 * row['inference_s']:6.0f} {1e3 * row['encode_store_s']:6.0f} "
                  f"{1e3 * row['rest_s']:6.0f}")  # fmt: skip
    print(
        "HTTP ms = POST /v1/jobs to the `completed` SSE event, client side. Split (server's "
        "JobTimings, ms): submit = POST round trip; queue = created -> claimed (worker "
        "polling); infer = engine in the worker; enc+st = PNG + WEBP thumbnail + store; "
        "rest = HTTP - queue - infer - enc+st (submit, DB writes, SSE polling, HTTP)."
    )
    for poll, idle in idles.items():
        shares = ", ".join(f"{name} {pct:.1f}%" for name, pct in idle.items())
        print(f"idle CPU at poll {poll:.2f} s over {args.idle_s:.0f} s (% of one core): {shares}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "model": args.model, "device": str(engine.device), "dtype": str(engine.dtype),
        "repeats": args.repeats, "torch": torch.__version__, "python": sys.version.split()[0],
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": [
            {"poll_interval_s": poll, "rows": rows, "idle_cpu_pct": idles[poll]}
            for poll, rows in results.items()
        ],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
