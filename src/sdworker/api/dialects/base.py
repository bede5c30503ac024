"""What every dialect shares: errors in the dialect's own shape, its field names in
messages, and building a JobSpec from translated fields.

A dialect's router uses `dialect_router(render)`: every error its routes raise (a body
that fails the dialect's schema, a JobSpec that fails validation, a job refused by
validate_job, an unknown job) reaches `render` as one `DialectError`, so clients of that
dialect parse one error format, and messages name the dialect's fields (`n`, not
`num_images`). FastAPI's exception handlers are app-wide, so this is done per route.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException  # FastAPI's is a subclass

from sdworker.api.errors import status_of
from sdworker.api.jobflow import submit, wait_for
from sdworker.api.services import Services
from sdworker.errors import InvalidJobError, SdworkerError
from sdworker.jobs import Job, JobSpec, JobStatus, describe_validation_error


@dataclass(frozen=True)
class DialectError:
    """One error, before a dialect renders it: HTTP status, our stable code, one line
    that names the field (in the dialect's own words), and that field."""

    status: int
    code: str
    message: str
    field: str | None = None


ErrorRenderer = Callable[[DialectError], Response]


class StatusError(SdworkerError):
    """An error a dialect answers with a status of its own choosing (504 on a timeout,
    500 for a failed job in protocols that report it so)."""

    def __init__(
        self, status: int, message: str, *, code: str = "error", field: str | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.status, self.code = status, code


def _field_errors(exc: RequestValidationError) -> DialectError:
    """FastAPI's body/query errors as one line: 'n: Input should be <= 10 (got 11)'."""
    lines, first = [], None
    for error in exc.errors():
        parts = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join(parts)
        first = first or (parts[-1] if parts else None)
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        if error.get("type") not in {"value_error", "missing"} and "input" in error:
            message += f" (got {error['input']!r})"
        lines.append(f"{where}: {message}" if where else message)
    return DialectError(422, "invalid_request", "; ".join(lines) or "invalid request", first)


def fastapi_detail(error: DialectError) -> JSONResponse:
    """FastAPI's own shapes, which the replaced FastAPI services answered with: a 422's
    `detail` list (loc split along a dotted field), else `{"detail": "..."}`."""
    detail: Any = error.message
    if error.status == 422:
        loc = ["body", *error.field.split(".")] if error.field else ["body"]
        detail = [{"loc": loc, "msg": error.message, "type": error.code}]
    return JSONResponse({"detail": detail}, status_code=error.status)


def to_dialect_error(exc: Exception) -> DialectError | None:
    """The DialectError for an exception a route raised; None for a bug (re-raised)."""
    if isinstance(exc, RequestValidationError):
        return _field_errors(exc)
    if isinstance(exc, StatusError):
        return DialectError(exc.status, exc.code, exc.message, exc.field)
    if isinstance(exc, SdworkerError):
        return DialectError(status_of(exc), exc.code, exc.message, exc.field)
    if isinstance(exc, HTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        return DialectError(
            exc.status_code, code.get(exc.status_code, "http_error"), str(exc.detail)
        )
    return None


def dialect_router(
    render: ErrorRenderer, *, names: Mapping[str, str] | None = None, **kwargs: Any
) -> APIRouter:
    """An APIRouter whose routes answer every user error through `render`, the fields
    named in the dialect's words (`names`: JobSpec field -> the dialect's name)."""

    class DialectRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    error = to_dialect_error(exc)
                    if error is None:
                        raise
                    return render(translated(error, names))

            return handle

    return APIRouter(route_class=DialectRoute, **kwargs)


def build_spec(fields: Mapping[str, Any], names: Mapping[str, str] | None = None) -> JobSpec:
    """A JobSpec from translated fields; a validation error names the dialect's field
    (`names` maps JobSpec field -> the dialect's name for it)."""
    try:
        return JobSpec.model_validate(dict(fields))
    except ValidationError as exc:
        message = describe_validation_error(exc)
        errors = exc.errors()
        field = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise InvalidJobError(
            rename_fields(message, names), field=rename_field(field, names)
        ) from None


def rename_field(field: str | None, names: Mapping[str, str] | None) -> str | None:
    if field is None or not names:
        return field
    return names.get(field, field)


def rename_fields(message: str, names: Mapping[str, str] | None) -> str:
    """'num_images: ...; steps: ...' with each leading field name in the dialect's words."""
    if not names:
        return message
    parts = []
    for part in message.split("; "):
        head, sep, rest = part.partition(": ")
        root, dot, tail = head.partition(".")
        if sep and root in names:
            head = names[root] + dot + tail
        parts.append(head + sep + rest)
    return "; ".join(parts)


def translated(error: DialectError, names: Mapping[str, str] | None) -> DialectError:
    """The error with its field (and the field names in its message) in the dialect's words."""
    if not names:
        return error
    return DialectError(
        error.status,
        error.code,
        rename_fields(error.message, names),
        rename_field(error.field, names),
    )


async def run_to_end(
    services: Services,
    spec: JobSpec,
    request: Request,
    what: str,
    *,
    failed_code: str = "job_failed",
    canceled_is_an_answer: bool = False,
) -> Job:
    """Submit a job and wait for it (the synchronous dialects): the succeeded job (or a
    canceled one when that is an answer), a 504 StatusError naming the job that goes on
    when SDWORKER_SYNC_TIMEOUT_S passes, a 500 with the job's error when it failed."""
    waited = await wait_for(services, await submit(spec, services), request=request)
    job = waited.job
    if job.status is JobStatus.SUCCEEDED and job.result and job.result.assets:
        return job
    if waited.disconnected or (canceled_is_an_answer and job.status is JobStatus.CANCELED):
        return job
    if not waited.finished:
        raise StatusError(
            504,
            f"{what} {job.id} did not finish in time; it goes on (GET /v1/jobs/{job.id})",
            code="timeout",
        )
    reason = job.error.message if job.error else job.status.value
    raise StatusError(500, f"{what} {job.id} failed: {reason}", code=failed_code)
