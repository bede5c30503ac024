"""ASGI middleware: request body size limit, API keys, request metrics.

Written as plain ASGI (not BaseHTTPMiddleware) so streaming responses (SSE) pass through
untouched and the body limit also holds for chunked uploads without Content-Length.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[Any]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """413 for request bodies over max_bytes, whether declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        text = f"request body over {self.max_bytes} bytes (SDWORKER_MAX_BODY_BYTES)"
        message = {"error": {"code": "body_too_large", "message": text}}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_json(send, 413, message, [])
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            incoming = await receive()
            if incoming["type"] == "http.request":
                seen += len(incoming.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException: FastAPI's body parsing passes it through as is
                    # (any other exception there becomes a 400).
                    raise HTTPException(413, detail=text)
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            if outgoing["type"] == "http.response.start":
                started = True
            await send(outgoing)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as exc:
            if exc.status_code != 413 or started:
                raise
            await _send_json(send, 413, message, [])


class ApiKeyMiddleware:
    """Every route but the health checks needs an API key when keys are set. The key is
    read as `Authorization: Bearer <key>` (native, OpenAI, RunPod) or as HTTP Basic with
    the key as password (AUTOMATIC1111 clients such as webuiapi's set_auth)."""

    def __init__(
        self, app: ASGIApp, keys: list[str], open_paths: frozenset[str] = OPEN_PATHS
    ) -> None:
        self.app, self.keys, self.open_paths = app, [key.encode() for key in keys], open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        tokens = _tokens(header)
        if not any(secrets.compare_digest(token, key) for token in tokens for key in self.keys):
            body = {
                "error": {
                    "code": "unauthorized",
                    "message": "missing or wrong API key: send 'Authorization: Bearer <key>'",
                }
            }
            await _send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


def _tokens(header: bytes) -> list[bytes]:
    """The API key candidates of an Authorization header."""
    scheme, _, rest = header.strip().partition(b" ")
    if scheme.lower() == b"bearer":
        return [rest.strip()]
    if scheme.lower() == b"basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True)
        except (binascii.Error, ValueError):
            return []
        return [decoded.partition(b":")[2]]
    return []


class MetricsMiddleware:
    """Counts requests and their latency by route template, method and status."""

    def __init__(self, app: ASGIApp, requests: Counter, latency: Histogram) -> None:
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.requests.labels(scope["method"], path, str(status)).inc()
            self.latency.labels(scope["method"], path).observe(time.perf_counter() - started)
