"""Other APIs sdworker speaks, each a thin adapter to JobSpec and back (no generation
logic of their own), mounted at the root or under a prefix (SDWORKER_DIALECTS).

Each dialect module has `build_router(settings, at_root) -> APIRouter`. At the root a
dialect leaves out the routes that the native API already serves as a superset of its
fields (`/health`, `/status`), so both answer from one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute, Route

from sdworker.errors import ConfigError
from sdworker.settings import Settings

RouterBuilder = Callable[[Settings, bool], APIRouter]


@dataclass(frozen=True)
class Dialect:
    name: str
    title: str
    build_router: RouterBuilder


def known_dialects() -> dict[str, Dialect]:
    """Every dialect by its SDWORKER_DIALECTS name."""
    from sdworker.api.dialects import a1111, candle, dream, edge, lcm, openai_images, runpod

    return {
        dialect.name: dialect
        for dialect in (
            Dialect("a1111", "AUTOMATIC1111 /sdapi/v1", a1111.build_router),
            Dialect("openai", "OpenAI Images", openai_images.build_router),
            Dialect("runpod", "RunPod serverless", runpod.build_router),
            Dialect("edge", "Edge-function worker (LUSTIFY SDXL)", edge.build_router),
            Dialect("lcm", "LCM server", lcm.build_router),
            Dialect("dream", "Dream AI queued service", dream.build_router),
            Dialect("candle", "Candle SD worker (sd-worker-rbee)", candle.build_router),
        )
    }


def mount_dialects(app: FastAPI, settings: Settings, native: list[APIRouter]) -> list[str]:
    """Include every enabled dialect's router at its prefix, after the native routers
    (already included); refuse (ConfigError) two routes on one method and path.
    Returns the path of every route served."""
    dialects = known_dialects()
    owners: dict[tuple[str, str], str] = {}
    paths = [route.path for route in app.routes if isinstance(route, Route)]
    for router in native:
        for route in router.routes:
            paths += _claim(owners, route, "", "the native API")
    for name, prefix in settings.dialect_prefixes.items():
        dialect = dialects[name]
        router = dialect.build_router(settings, prefix == "")
        for route in router.routes:
            paths += _claim(owners, route, prefix, f"dialect {name}")
        app.include_router(router, prefix=prefix, tags=[f"dialect: {dialect.title}"])
    return paths


_PARAM_RE = re.compile(r"\{[^}]*\}")


def _claim(
    owners: dict[tuple[str, str], str], route: BaseRoute, prefix: str, owner: str
) -> list[str]:
    """Record the route's (method, path) keys as the owner's; ConfigError on a clash."""
    if not isinstance(route, Route):
        return []
    path = prefix + route.path
    shape = _PARAM_RE.sub("{}", path)  # /status/{id} meets /status/{job_id}
    for method in sorted(route.methods or {"GET"}):
        key = (method, shape)
        if method != "HEAD" and key in owners:
            name = owner.removeprefix("dialect ")
            raise ConfigError(
                f"{owner} and {owners[key]} both serve {method} {path}: give one a prefix "
                f'or turn it off, e.g. SDWORKER_DIALECTS=\'{{"{name}": "/{name}"}}\''
            )
        owners[key] = owner
    return [path]
