"""Runs the worker as a child process of `serve`, restarts it when it dies and drains it
on shutdown. The API process stays free of torch; a crash on the device takes down only
the worker."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from ulid import ULID

from sdworker.broker.base import Broker
from sdworker.settings import Settings

log = logging.getLogger(__name__)

MAX_RESTART_DELAY_S = 30.0


class WorkerSupervisor:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        on_reclaimed: Callable[[list[str]], None] | None = None,
    ) -> None:
        """on_reclaimed(job_ids): told of jobs taken back from a dead worker (some may
        have ended, e.g. failed after their last attempt, and need their webhook)."""
        self._settings = settings
        self._broker = broker
        self._on_reclaimed = on_reclaimed
        self._process: subprocess.Popen[bytes] | None = None
        self._worker_id: str | None = None
        self._spawned_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self.restarts = 0

    @property
    def worker_id(self) -> str | None:
        return self._worker_id

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # SDWORKER_WORKER_ID / WORKER_ID names it (an orchestrator knows it by that id);
        # a restarted worker keeps it.
        self._worker_id = self._settings.worker_id or f"worker-{ULID()}"
        command = [
            sys.executable, "-m", "sdworker", "worker", "--worker-id", self._worker_id,
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        # Own session: Ctrl-C in the terminal reaches serve, which drains the worker itself.
        self._process = subprocess.Popen(command, env=dict(os.environ), start_new_session=True)
        self._spawned_at = time.monotonic()
        log.info("worker %s started (pid %s)", self._worker_id, self._process.pid)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.wait(0.2):
            process = self._process
            if process is None or process.poll() is None:
                if time.monotonic() - self._spawned_at > 60:
                    delay = 1.0  # it stayed up: the next crash restarts quickly again
                continue
            log.warning(
                "worker %s exited with %s; restarting in %.0fs",
                self._worker_id, process.returncode, delay,
            )  # fmt: skip
            self._requeue_jobs_of(self._worker_id)
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            self._spawn()
            delay = min(delay * 2, MAX_RESTART_DELAY_S)

    def _requeue_jobs_of(self, worker_id: str | None) -> None:
        if worker_id is None:
            return
        try:
            requeued = self._broker.reclaim(stale_after_s=0, worker_id=worker_id)
        except Exception:  # the broker is away: the heartbeat timeout will reclaim them
            log.exception("could not re-queue the jobs of stopped worker %s", worker_id)
            return
        if requeued:
            log.warning("re-queued jobs of stopped worker %s: %s", worker_id, requeued)
            if self._on_reclaimed is not None:
                self._on_reclaimed(requeued)

    def stop(self) -> None:
        """Drain: ask the worker to finish its job, wait drain_timeout_s, then kill it and
        put its job back in the queue. Nothing accepted is lost."""
        self._stopping.set()
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=self._settings.drain_timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker %s did not drain in time; killing it", self._worker_id)
            process.kill()
            process.wait()
        self._requeue_jobs_of(self._worker_id)
