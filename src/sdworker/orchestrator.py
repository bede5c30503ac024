"""Running as an orchestrator's worker, as sd-worker-rbee did for the rbee hive: its
`--sd-version` names, and the registration and heartbeats sent to its `--callback-url`.

The original left both as TODOs (`// TODO: Register with hive`); what is sent here is
sdworker's own: one JSON body for every POST to the callback URL, first with
`event: "register"` (repeated until it is accepted), then `"heartbeat"` every interval
and at once when the status changes, and `"shutdown"` (status `stopped`) on the way
out. It also carries rbee's `WorkerHeartbeat` shape (`worker: {id, model_id, device,
port, status, implementation, version}`, `timestamp`). Failures are logged and
retried; they never stop the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from sdworker import __version__
from sdworker.broker.base import Broker
from sdworker.errors import ConfigError
from sdworker.settings import Settings

log = logging.getLogger(__name__)

IMPLEMENTATION = "sdworker"
STARTING, READY, BUSY, UNHEALTHY, STOPPED = "starting", "ready", "busy", "unhealthy", "stopped"
TICK_S = 0.25  # how often the state is looked at (a change is sent at once)


@dataclass(frozen=True)
class SdVersion:
    """One `--sd-version` of sd-worker-rbee and the model it stands for."""

    name: str
    model: str
    variant: str | None = None  # turbo: few steps, no guidance


SD_VERSIONS = {
    version.name: version
    for version in (
        SdVersion("v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        SdVersion("v2-1", "stabilityai/stable-diffusion-2-1"),
        SdVersion("xl", "stabilityai/stable-diffusion-xl-base-1.0"),
        SdVersion("turbo", "stabilityai/sdxl-turbo", variant="turbo"),
    )
}
# The other spellings its parser took (SDVersion::from_str, lowercased).
SD_VERSION_ALIASES = {"v1.5": "v1-5", "1.5": "v1-5", "v2.1": "v2-1", "2.1": "v2-1"}
INPAINT_VERSIONS = frozenset(
    {"v1-5-inpaint", "v1.5-inpaint", "v2-inpaint", "v2.1-inpaint", "xl-inpaint"}
)


def parse_sd_version(text: str) -> SdVersion:
    """The SdVersion a `--sd-version` names; ConfigError listing the supported ones."""
    name = text.strip().lower()
    name = SD_VERSION_ALIASES.get(name, name)
    supported = ", ".join(SD_VERSIONS)
    if name in INPAINT_VERSIONS:
        raise ConfigError(
            f"--sd-version {text}: inpaint-only checkpoints are not supported yet; use "
            f"{supported} (POST /inpaint works with those base models)",
            field="sd_version",
        )
    if name not in SD_VERSIONS:
        raise ConfigError(f"Unknown SD version: {text}. Supported: {supported}", field="sd_version")
    return SD_VERSIONS[name]


@dataclass(frozen=True)
class WorkerState:
    """What a heartbeat reports: the status and what the worker runs on."""

    status: str
    model_version: str | None
    device: str | None


Probe = Callable[[], WorkerState]


def broker_probe(broker: Broker, settings: Settings, worker_id: str) -> Probe:
    """The state of worker `worker_id` from its own heartbeats to the broker: starting
    until its model is loaded, then ready or busy (holding a job); unhealthy when it has
    been silent past the heartbeat timeout."""
    started = time.monotonic()

    def probe() -> WorkerState:
        now = datetime.now(UTC)
        horizon = settings.heartbeat_timeout_s
        worker = next(
            (
                w
                for w in broker.workers()
                if w.id == worker_id
                and w.last_seen is not None
                and (now - w.last_seen).total_seconds() < horizon
            ),
            None,
        )
        if worker is None:
            young = time.monotonic() - started < horizon
            return WorkerState(STARTING if young else UNHEALTHY, settings.model, settings.device)
        busy = BUSY if worker.jobs_held() else READY
        status = busy if worker.model_loaded else STARTING
        return WorkerState(status, worker.model or settings.model, worker.device)

    return probe


@dataclass(frozen=True)
class Identity:
    """What stays the same in every message of this worker."""

    worker_id: str
    port: int
    url: str
    sd_version: str | None = None


class OrchestratorClient:
    """Registers with the orchestrator and keeps it told of the worker's state, from a
    thread of its own; `stop()` sends a last `stopped` message."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        probe: Probe,
        *,
        interval_s: float,
        ready: Callable[[], bool] = lambda: True,
        timeout_s: float = 5.0,
    ) -> None:
        """ready(): whether the API answers yet (nothing is sent before it does)."""
        self.url = url
        # For logs: no credentials or tokens that the URL may carry.
        parsed = httpx.URL(url)
        self.shown_url = str(parsed.copy_with(userinfo=b"", query=None, fragment=None))
        self.identity = identity
        self.registered = False
        self._probe = probe
        self._interval_s = interval_s
        self._ready = ready
        self._http = httpx.Client(timeout=timeout_s)
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._failing = False
        self._last: WorkerState | None = None
        self._thread = threading.Thread(target=self._run, name="orchestrator", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the heartbeats; tell the orchestrator this worker is gone."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self.registered:
            last = self._last or WorkerState(STOPPED, None, None)
            gone = WorkerState(STOPPED, last.model_version, last.device)
            self._post(self.payload("shutdown", gone))
        self._http.close()

    def payload(self, event: str, state: WorkerState) -> dict[str, Any]:
        """The body of one POST: sdworker's fields and rbee's WorkerHeartbeat shape."""
        me = self.identity
        timestamp = datetime.now(UTC).isoformat()
        return {
            "event": event,
            "worker_id": me.worker_id,
            "status": state.status,
            "model_version": state.model_version,
            "sd_version": me.sd_version,
            "device": state.device,
            "port": me.port,
            "url": me.url,
            "implementation": IMPLEMENTATION,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "timestamp": timestamp,
            "worker": {
                "id": me.worker_id,
                "model_id": state.model_version,
                "device": state.device,
                "port": me.port,
                "status": state.status,
                "implementation": IMPLEMENTATION,
                "version": __version__,
            },
        }

    def _run(self) -> None:
        while not self._ready():
            if self._stop.wait(TICK_S):
                return
        due = 0.0
        while True:
            state = self._look()
            now = time.monotonic()
            changed = state is not None and self._last is not None and state != self._last
            if state is not None and (now >= due or changed):
                event = "heartbeat" if self.registered else "register"
                if self._post(self.payload(event, state)) and not self.registered:
                    self.registered = True
                    log.info("registered with the orchestrator at %s", self.shown_url)
                self._last, due = state, now + self._interval_s
            if self._stop.wait(TICK_S):
                return

    def _look(self) -> WorkerState | None:
        try:
            return self._probe()
        except Exception:  # the broker is away for a moment: try again next tick
            log.exception("could not read the worker's state for the orchestrator")
            return None

    def _post(self, body: dict[str, Any]) -> bool:
        """One POST; a failure is logged once per streak of failures."""
        try:
            response = self._http.post(self.url, json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            if not self._failing:
                log.warning(
                    "orchestrator %s: %s failed (%s); retrying every %.1fs",
                    self.shown_url, body["event"], exc, self._interval_s,
                )  # fmt: skip
            self._failing = True
            return False
        if self._failing:
            log.info("orchestrator %s reachable again", self.shown_url)
        self._failing = False
        return True
