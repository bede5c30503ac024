"""The one place where sdworker errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sdworker.errors import (
    InputImageError,
    InvalidJobError,
    JobConflictError,
    JobNotFoundError,
    ModelLoadError,
    ModelNotFoundError,
    SdworkerError,
)
from sdworker.storage.base import AssetNotFoundError, InvalidKeyError

STATUS_BY_ERROR: dict[type[SdworkerError], int] = {
    InvalidJobError: 422,
    InputImageError: 422,
    ModelNotFoundError: 422,
    ModelLoadError: 422,
    JobNotFoundError: 404,
    AssetNotFoundError: 404,
    InvalidKeyError: 400,
    JobConflictError: 409,
}


def error_body(exc: SdworkerError, location: str = "body") -> dict[str, object]:
    """FastAPI's own 422 shape, so clients parse one format for every field error."""
    loc = [location, exc.field] if exc.field else [location]
    return {
        "detail": [{"loc": loc, "msg": exc.message, "type": exc.code}],
        "error": {"code": exc.code, "message": exc.message},
    }


def status_of(exc: SdworkerError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def install_error_handlers(app: FastAPI) -> None:
    async def on_sdworker_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, SdworkerError)
        return JSONResponse(error_body(exc), status_code=status_of(exc))

    app.add_exception_handler(SdworkerError, on_sdworker_error)
