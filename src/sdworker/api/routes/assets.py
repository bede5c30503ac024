"""Stored outputs of local storage."""

from __future__ import annotations

from fastapi import APIRouter, Response

from sdworker.api.deps import ServicesDep

router = APIRouter(prefix="/v1", tags=["assets"])


@router.get(
    "/assets/{key:path}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/webp": {}, "image/jpeg": {}}}},
)
def get_asset(key: str, services: ServicesDep) -> Response:
    """An image or thumbnail by key, `{owner}/{job_id}/{i}.png` or `{i}.thumb.webp`."""
    stored = services.storage.get(key)
    # Keys are deterministic per job and image; a re-run writes the same bytes.
    return Response(
        stored.data, media_type=stored.content_type, headers={"Cache-Control": "max-age=86400"}
    )
