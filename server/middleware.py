"""ASGI middleware around the routes: request counting, body limits, JSON bodies, API keys.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and client
disconnects pass through untouched. Order, outermost first:

- `RequestMetrics`: counts `kiln_requests_total{endpoint, status}` for every response,
  errors included (unknown paths are counted as endpoint "other").
- `BodyLimit`: 413 when Content-Length, or the bytes actually received, exceed the limit.
  It also treats POST bodies sent as `application/x-www-form-urlencoded` (what
  `curl -d` sends) or without a content type as JSON: the API only takes JSON.
- `APIKey`: when a key is configured, /v1/* needs `Authorization: Bearer <key>` (401
  otherwise). The tokenizer endpoints, /health and /metrics stay open, as in vLLM:
  lm-eval sends the key only to /v1/completions.
"""

from __future__ import annotations

import hmac
from typing import Awaitable, Callable

from fastapi import HTTPException

from .errors import error_response
from .metrics import ServerMetrics

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_CONTENT_TYPES_TO_FIX = (b"", b"application/x-www-form-urlencoded", b"text/plain")


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes every handler

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in self.endpoints else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit = self.max_body_bytes
        too_large = f"the request body is larger than this server's limit of {limit} bytes (--max-body-bytes)"
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = None
            if declared is not None and declared > limit:
                await error_response(413, too_large, code="request_too_large")(scope, receive, send)
                return
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type in JSON_CONTENT_TYPES_TO_FIX:
            raw = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": raw + [(b"content-type", b"application/json")]}
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # raised inside the route's body read; FastAPI passes HTTPException through
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counting_receive, send)


class APIKey:
    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, credentials = given.strip().partition(b" ")
        # the scheme is case-insensitive (RFC 7235): "bearer KEY" works too
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), self.expected):
            message = ("missing API key: send the header `Authorization: Bearer <key>`" if not given
                       else "invalid API key")
            response = error_response(401, message, code="invalid_api_key",
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
