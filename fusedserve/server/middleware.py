"""Pure ASGI middleware that runs before any route: API-key authentication and the request-body size cap.

Authentication compares the bearer token against every configured key with hmac.compare_digest (no early
exit), and never guards /health (nor /metrics with --metrics-no-auth). The size cap buffers at most
`max_bytes` of body before the app sees it; a larger body is a 413 without reading the rest. Both answer
with OpenAI error JSON from errors.py.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fusedserve.server.errors import OpenAIError, body_too_large, unauthorized


async def _send_error(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    await error.response()(scope, receive, send)


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: list[str], open_paths: set[str]) -> None:
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.open_paths = open_paths

    def _authorized(self, scope: Scope) -> bool:
        token = (_bearer_token(scope) or "").encode()
        matched = False
        for key in self.api_keys:
            matched |= hmac.compare_digest(token, key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        await _send_error(unauthorized(), scope, receive, send)


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(body_too_large(self.max_bytes), scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await _send_error(body_too_large(self.max_bytes), scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the buffered body over once, then passes through (disconnect notices)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
