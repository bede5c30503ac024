"""What both broker backends share: how a stored job record becomes a Job, spec digests
for idempotency, and the constants of their bookkeeping."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sdworker.jobs import (
    Job,
    JobError,
    JobProgress,
    JobResult,
    JobSpec,
    JobStatus,
    Priority,
    WebhookAttempt,
)

PRIORITY_BY_RANK = {priority.rank: priority for priority in Priority}
WORKER_RETENTION_S = 24 * 3600  # workers not seen for a day leave /status


def model_key(spec: JobSpec) -> str:
    """The model a job runs on, as claim's prefer_models names it: "" is the deployment's
    default model (a job that names it explicitly has another key; the broker does not
    resolve names, the worker says which keys it has loaded)."""
    return spec.model or ""


def spec_digest(spec: JobSpec) -> str:
    """Equal specs give equal digests whatever the key order of their metadata."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def timestamp(value: Any) -> datetime | None:
    """Epoch seconds (a number, or text as Redis keeps it) as a UTC datetime."""
    return datetime.fromtimestamp(float(value), UTC) if value not in (None, "") else None


def job_from_record(record: Mapping[str, Any], webhook_attempts: list[WebhookAttempt]) -> Job:
    """A stored job (a SQLite row or a Redis hash; numbers may be text) as a Job."""
    spec = JobSpec.model_validate_json(record["spec"])
    error = None
    if record["error_code"]:
        error = JobError(code=record["error_code"], message=record["error_message"] or "")
    return Job(
        id=record["id"],
        status=JobStatus(record["status"]),
        spec=spec,
        priority=PRIORITY_BY_RANK[int(record["priority"])],
        owner=record["owner"],
        attempts=int(record["attempts"] or 0),
        worker_id=record["worker_id"] or None,
        progress=JobProgress(
            step=int(record["step"] or 0), total_steps=int(record["total_steps"] or 0)
        ),
        created_at=timestamp(record["created_at"]),
        started_at=timestamp(record["started_at"]),
        finished_at=timestamp(record["finished_at"]),
        result=JobResult.model_validate_json(record["result"]) if record["result"] else None,
        error=error,
        metadata=spec.metadata,
        webhook_attempts=webhook_attempts,
    )
