"""ASGI middleware: request-body size limit (413) and HTTP status counting.

The body of a POST is read here, up to the limit, before any route runs: a declared
``Content-Length`` over the limit is refused without reading, a chunked body is refused as soon
as it grows past the limit. The route then gets the buffered body; later ``receive()`` calls go
to the server again, so a route can still notice the client disconnecting.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from framework.server.errors import APIError, too_large

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class LimitsMiddleware:
    """Refuse bodies over ``max_body_bytes`` with 413; count ``/v1`` responses by status."""

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int, metrics: Any = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        metrics = self.metrics if scope.get("path", "").startswith("/v1/") else None

        async def counted_send(message: Message) -> None:
            if metrics is not None and message["type"] == "http.response.start":
                metrics.http.inc(1, str(message["status"]))
            await send(message)

        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, counted_send)
            return
        limit = self.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _reply(counted_send, APIError(400, "invalid Content-Length header"))
                return
            if int(declared) > limit:
                await _reply(counted_send, _too_large(int(declared), limit))
                return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _reply(counted_send, _too_large(size, limit))
                return
            chunks.append(body)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, counted_send)


def _too_large(size: int, limit: int) -> APIError:
    return too_large(f"the request body ({size} bytes or more) exceeds this server's limit of {limit} bytes")


async def _reply(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
