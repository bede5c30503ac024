"""Stored outputs of local storage."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from sdworker.api.deps import ServicesDep
from sdworker.storage.base import content_type_of
from sdworker.storage.local import LocalStorage

router = APIRouter(prefix="/v1", tags=["assets"])

_CACHE = {"Cache-Control": "max-age=86400"}  # keys are deterministic per job and output


@router.get(
    "/assets/{key:path}",
    response_class=Response,
    responses={
        200: {
            "content": {
                "image/png": {},
                "image/webp": {},
                "image/jpeg": {},
                "video/mp4": {},
            }
        },
        206: {"description": "A byte range (Range header), for video players that seek."},
    },
)
def get_asset(key: str, services: ServicesDep) -> Response:
    """An output by key: `{owner}/{job_id}/{i}.png` (or .jpeg/.webp/.mp4) or its
    `{i}.thumb.webp` thumbnail. Local files honour Range requests (video seeking)."""
    storage = services.storage
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.file_path(key), media_type=content_type_of(key), headers=_CACHE)
    stored = storage.get(key)
    return Response(stored.data, media_type=stored.content_type, headers=_CACHE)
