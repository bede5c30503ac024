"""Signed webhook delivery (Standard Webhooks: webhook-id, webhook-timestamp,
webhook-signature = space-separated `v1,<base64 HMAC-SHA256(id.timestamp.body)>`, one per
secret, so secrets can be rotated). Retries with exponential backoff and jitter on
network errors, 5xx, 408 and 429 (honouring Retry-After); redirects are never followed;
targets pass the same address guard as input URLs. Deliveries run on a small thread pool,
never on the generation loop, and every attempt's outcome is recorded on the job.
The body is sdworker's own, or the edge-function worker's job-callback (plus its bearer
token) for jobs whose spec.webhook_format is edge (bodies in webhook_payloads.py).
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from sdworker.broker.base import Broker
from sdworker.jobs import EventType, Job, JobStatus, WebhookAttempt, WebhookFormat
from sdworker.netguard import AddressPolicy, UnsafeUrlError, request_extensions
from sdworker.settings import Settings
from sdworker.webhook_payloads import edge_payload_for, payload_for

log = logging.getLogger(__name__)

TERMINAL_EVENTS = {
    JobStatus.SUCCEEDED: EventType.COMPLETED,
    JobStatus.FAILED: EventType.FAILED,
    JobStatus.CANCELED: EventType.CANCELED,
}
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
TIMEOUT_S = 15.0
LANES = 4
MAX_RETRY_DELAY_S = 300.0


def _secret_bytes(secret: str) -> bytes:
    """`whsec_<base64>` as Standard Webhooks writes secrets; any other text as is."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def signature_header(secrets: list[str], message_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature value: one `v1,<sig>` per secret (rotation)."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    return " ".join(
        Webhook(_secret_bytes(secret)).sign(message_id, moment, body) for secret in secrets
    )


def retry_delay(attempt: int, retry_after: str | None, base_s: float) -> float:
    """Exponential backoff with "equal jitter" (half fixed, half random), or the
    receiver's Retry-After (seconds or an HTTP date) when that is later."""
    ceiling: float = min(base_s * 2.0 ** (attempt - 1), MAX_RETRY_DELAY_S)
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    wait = 0.0
    if retry_after and retry_after.strip().isdigit():
        wait = float(retry_after)
    elif retry_after:
        try:
            wait = (
                email.utils.parsedate_to_datetime(retry_after) - datetime.now(UTC)
            ).total_seconds()
        except (TypeError, ValueError):
            wait = 0.0
    return min(max(delay, wait), MAX_RETRY_DELAY_S)


class WebhookSender:
    """Delivers job webhooks in the background for one process."""

    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._settings = settings
        self._broker = broker
        self._secrets = settings.webhook_secret_list
        self._policy: AddressPolicy = settings.address_policy
        self._sleep = sleep
        # One thread per lane and one lane per job: a job's events arrive in order (a
        # retrying delivery holds back that job's later events), other jobs go on.
        self._lanes = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"webhook-{lane}")
            for lane in range(LANES)
        ]
        self._last_progress: dict[str, float] = {}
        self._lock = threading.Lock()

    def target_of(self, job: Job) -> str | None:
        if job.spec.webhook_format is WebhookFormat.EDGE:
            # Only ever the operator's job-callback: edge callbacks carry its bearer token.
            return self._settings.edge_callback_target
        return job.spec.webhook or self._settings.webhook_url

    def notify(self, job: Job, event: EventType) -> None:
        """Queue a delivery for a job event: terminal events always, progress events only
        when the job asked for them, at most every webhook_progress_interval_s. Edge-format
        jobs get that system's job-callback body, terminal events only."""
        url = self.target_of(job)
        if not url:
            return
        edge = job.spec.webhook_format is WebhookFormat.EDGE
        if event is EventType.PROGRESS:
            if edge or not job.spec.webhook_progress or not self._progress_due(job.id):
                return
        elif event.is_terminal():
            with self._lock:
                self._last_progress.pop(job.id, None)
        payload = edge_payload_for(job, self._settings) if edge else payload_for(job, event)
        body = json.dumps(payload, separators=(",", ":"))
        message_id = f"{job.id}.{event.value}"
        if event is EventType.PROGRESS:
            message_id += f".{job.progress.step}"
        headers = self._edge_headers() if edge else {}
        lane = self._lanes[zlib.crc32(job.id.encode()) % LANES]
        lane.submit(self._deliver, job.id, event, url, message_id, body, headers)

    def send_edge(self, url: str, message_id: str, payload: dict[str, Any]) -> None:
        """Deliver an edge job-callback body that belongs to no job (a queued payload
        refused before it became one): signed and retried like job webhooks, its
        attempts only logged."""
        body = json.dumps(payload, separators=(",", ":"))
        lane = self._lanes[zlib.crc32(message_id.encode()) % LANES]
        lane.submit(
            self._deliver, None, EventType.FAILED, url, message_id, body, self._edge_headers()
        )

    def _edge_headers(self) -> dict[str, str]:
        """The edge system's job-callback checks a bearer token (its service key)."""
        token = self._settings.edge_callback_token.get_secret_value()
        return {"authorization": f"Bearer {token}"} if token else {}

    def notify_ended(self, job_ids: list[str]) -> None:
        """Webhooks for jobs that a reclaim may have ended (failed after their last
        attempt, or canceled), which no worker will report."""
        for job_id in job_ids:
            try:
                job = self._broker.get(job_id)
            except Exception:
                log.exception("could not read reclaimed job %s", job_id)
                continue
            event = TERMINAL_EVENTS.get(job.status)
            if event is not None:
                self.notify(job, event)

    def _progress_due(self, job_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last_progress.get(job_id)
            if last is not None and now - last < self._settings.webhook_progress_interval_s:
                return False
            self._last_progress[job_id] = now
            return True

    def close(self, timeout_s: float | None = None) -> None:
        """Finish queued deliveries (their retries included), then stop."""
        waiter = threading.Thread(target=self._shutdown)
        waiter.start()
        waiter.join(timeout_s)
        if waiter.is_alive():
            log.warning("webhook deliveries still pending at shutdown; dropping the rest")
            self.abandon()

    def _shutdown(self) -> None:
        for lane in self._lanes:
            lane.shutdown(wait=True)

    def abandon(self) -> None:
        """Drop deliveries not started yet (after close() timed out)."""
        for lane in self._lanes:
            lane.shutdown(wait=False, cancel_futures=True)

    def _deliver(
        self,
        job_id: str | None,
        event: EventType,
        url: str,
        message_id: str,
        body: str,
        headers: dict[str, str],
    ) -> None:
        """One delivery with its retries; the same webhook-id on every attempt."""
        try:
            for attempt in range(1, self._settings.webhook_max_attempts + 1):
                record, retry_after = self._attempt(url, message_id, body, attempt, event, headers)
                self._record(job_id, message_id, record)
                if record.delivered or not record.retryable:
                    return
                if attempt < self._settings.webhook_max_attempts:
                    self._sleep(
                        retry_delay(attempt, retry_after, self._settings.webhook_retry_base_s)
                    )
        except Exception:  # a delivery bug must never take the worker down
            log.exception("webhook delivery for job %s failed", job_id)

    def _record(self, job_id: str | None, message_id: str, record: WebhookAttempt) -> None:
        if job_id is None:  # no job to keep it on
            log_attempt = log.info if record.delivered else log.warning
            log_attempt("webhook %s attempt %s: %s", message_id, record.attempt, record.error)
            return
        try:
            self._broker.record_webhook_attempt(job_id, record)
        except Exception:
            log.exception("could not record a webhook attempt of job %s", job_id)

    def _attempt(
        self,
        url: str,
        message_id: str,
        body: str,
        attempt: int,
        event: EventType,
        extra_headers: dict[str, str],
    ) -> tuple[WebhookAttempt, str | None]:
        started = time.monotonic()
        timestamp = int(time.time())

        def outcome(**fields: Any) -> WebhookAttempt:
            return WebhookAttempt(
                event=event.value,
                attempt=attempt,
                message_id=message_id,
                at=datetime.now(UTC),
                duration_ms=round((time.monotonic() - started) * 1000, 1),
                **fields,
            )

        try:
            target = self._policy.resolve(url)
        except UnsafeUrlError as exc:
            return outcome(error=f"refused: {exc}", retryable=False), None
        headers = {
            "content-type": "application/json",
            "user-agent": "sdworker-webhooks",
            "host": target.host_header,
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            **extra_headers,
        }
        if self._secrets:
            headers["webhook-signature"] = signature_header(
                self._secrets, message_id, timestamp, body
            )
        try:
            client = httpx.Client(timeout=TIMEOUT_S, follow_redirects=False, trust_env=False)
            # Streamed and never read: a receiver cannot make us hold a huge body.
            with (
                client,
                client.stream(
                    "POST",
                    target.url,
                    content=body,
                    headers=headers,
                    extensions=request_extensions(target),
                ) as response,
            ):
                status = response.status_code
                retry_after = response.headers.get("retry-after")
        except httpx.HTTPError as exc:
            return outcome(error=type(exc).__name__, retryable=True), None
        delivered = 200 <= status < 300
        retryable = status in RETRY_STATUSES or status >= 500
        error = (
            None
            if delivered
            else f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        )
        return (
            outcome(status_code=status, delivered=delivered, retryable=retryable, error=error),
            retry_after,
        )
