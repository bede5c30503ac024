"""The edge system's job queue: a Redis list that its edge function LPUSHes JSON job
payloads to (`sdxl_queue`), consumed from the right end as the replaced worker did.

The replaced worker RPOPped, so a job it took and then crashed on was gone. Here an
item is moved atomically (LMOVE) to a processing list, handed to `handle` (which turns
it into a queued job, or reports it refused), and only then removed from the processing
list; what a crash leaves there is handed over again at the next start. Handing an item
over twice is harmless: the job's idempotency key is the payload's id.

The list is polled (no blocking pop): drained while it has items, then one wait of
SDWORKER_EDGE_POLL_INTERVAL_S. A Redis outage is logged and retried with backoff. An item
whose handover keeps failing (HANDOVER_ATTEMPTS times in a row, e.g. a payload that trips
a bug) is moved to the dead-letter list `<queue>:dead`, kept for an operator, so one bad
item never holds up the ones behind it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from sdworker.settings import Settings

log = logging.getLogger(__name__)

Handler = Callable[[bytes], None]
DRAIN_MAX = 64  # items taken in a row before the stop flag is looked at again
MAX_BACKOFF_S = 30.0
HANDOVER_ATTEMPTS = 5


def dead_letter_list(queue: str) -> str:
    """Where items go whose handover failed HANDOVER_ATTEMPTS times."""
    return f"{queue}:dead"


def processing_list(queue: str) -> str:
    """Where items wait between LMOVE and their job being queued (shared by consumers:
    a re-driven item that another consumer already queued is the same job)."""
    return f"{queue}:processing"


class EdgeQueueConsumer:
    """A thread that feeds the edge list's payloads to `handle`.

    `handle(raw)` must return once the payload is a queued job or has been reported as
    refused; it raises only for a passing trouble (the job queue unreachable), and the
    item then stays in the processing list and is handed over again after a backoff.
    """

    def __init__(self, settings: Settings, handle: Handler, *, client: Any = None) -> None:
        self._queue = settings.edge_queue
        self._processing = processing_list(settings.edge_queue)
        self._interval = settings.edge_poll_interval_s
        self._handle = handle
        self._redis: Any = client or redis.Redis.from_url(
            settings.edge_queue_url.get_secret_value(),
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        self._owns_client = client is None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recovered = False  # the processing list was re-driven since start
        self._pending: list[bytes] = []  # taken, not yet handled (handle failed)
        self._failures: dict[bytes, int] = {}  # failed handovers of the pending items

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="edge-queue", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop after the item in hand; what is not handled stays in the processing list."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._owns_client:
            self._redis.close()

    def run(self) -> None:
        log.info("consuming edge jobs from Redis list %s", self._queue)
        failures = 0
        while not self._stop.is_set():
            try:
                taken = self.poll_once()
            except redis.RedisError as exc:
                failures += 1
                self._recovered = False  # re-drive what an outage left half done
                wait = min(self._interval * 2**failures, MAX_BACKOFF_S)
                log.warning("edge queue unreachable (%s); retrying in %.1fs", exc, wait)
                self._stop.wait(wait)
                continue
            failures = 0
            if not taken:
                self._stop.wait(self._interval)

    def poll_once(self) -> int:
        """Re-drive what a crash left (once), retry what failed, then drain the list.
        Returns how many items were handed over; 0 when there was nothing or a handover
        failed (so the loop waits before the next try)."""
        if not self._recovered:
            left = self._redis.lrange(self._processing, 0, -1)
            if left:
                log.warning("re-driving %s edge job(s) left in %s", len(left), self._processing)
            self._pending = list(reversed(left))  # oldest (rightmost) first
            self._recovered = True
        done = 0
        while self._pending:
            if not self._hand_over(self._pending[0]):
                return 0
            self._pending.pop(0)
            done += 1
        for _ in range(DRAIN_MAX):
            if self._stop.is_set():
                break
            raw = self._redis.lmove(self._queue, self._processing, "RIGHT", "LEFT")
            if raw is None:
                break
            if not self._hand_over(raw):
                self._pending.append(raw)
                return 0
            done += 1
        return done

    def _hand_over(self, raw: bytes) -> bool:
        """handle(raw), then drop it from the processing list; False when handle failed
        (it is retried), True once done or moved to the dead-letter list."""
        try:
            self._handle(raw)
        except Exception:
            failures = self._failures.get(raw, 0) + 1
            if failures < HANDOVER_ATTEMPTS:
                self._failures[raw] = failures
                log.exception(
                    "an edge job could not be queued (attempt %s); it stays in %s",
                    failures,
                    self._processing,
                )
                return False
            dead = dead_letter_list(self._queue)
            log.exception("an edge job failed %s handovers; moved to %s", failures, dead)
            self._redis.lpush(dead, raw)
        self._failures.pop(raw, None)
        self._redis.lrem(self._processing, 1, raw)
        return True
