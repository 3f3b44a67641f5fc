"""Abort work the moment its client goes away.

A route's handler runs as a task raced against a listener for the ASGI `http.disconnect` message. If the
client disconnects first, the handler task is cancelled and awaited, so its engine iterators are closed
(requests aborted, KV slots freed) before this returns. Once a streaming response has started, Starlette's
StreamingResponse does the same race for the body, and cancellation reaches the stream's generators.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

CLIENT_CLOSED_REQUEST = 499  # nginx's status for "client went away"; nobody receives it


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, handler: Coroutine[Any, Any, Response]) -> Response:
    handler_task = asyncio.ensure_future(handler)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({handler_task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not handler_task.done():
            handler_task.cancel()
            await asyncio.gather(handler_task, return_exceptions=True)
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
    if handler_task.cancelled():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return handler_task.result()
