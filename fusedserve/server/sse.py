"""Server-sent events: `data: {json}` per event, `data: [DONE]` at the end, errors as a data event.

An error after the response has started cannot change the status code, so it is sent as a data event with a
top-level "error" object (the openai SDK raises on that), followed by [DONE]. The event source is always
closed, which closes the engine iterators behind it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from fusedserve.server.errors import OpenAIError, internal_error

logger = logging.getLogger("fusedserve.server")

DONE_EVENT = "data: [DONE]\n\n"


def data_event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


def error_event(error: OpenAIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


async def _events(source: AsyncGenerator[BaseModel, None]) -> AsyncIterator[str]:
    try:
        async for payload in source:
            yield data_event(payload)
    except OpenAIError as error:
        yield error_event(error)
    except Exception:
        logger.exception("stream failed")
        yield error_event(internal_error())
    finally:
        await source.aclose()
    yield DONE_EVENT


def sse_response(source: AsyncGenerator[BaseModel, None]) -> StreamingResponse:
    return StreamingResponse(
        _events(source),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
