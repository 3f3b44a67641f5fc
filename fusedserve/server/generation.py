"""Running one HTTP request's engine requests: start them all, then merge their chunks in arrival order.

`start_choices` submits every choice and waits for each one's first chunk, so admission failures (prompt too
long, overloaded, engine dead) and immediate generation failures become HTTP errors before any response
starts. `merge_choices` then yields (choice index, chunk) as they come. Whatever way this ends — finished,
failed, timed out, or cancelled because the client went away — every engine iterator is closed, which aborts
its request and frees its KV slot. Nothing here knows about HTTP response shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fusedserve.engine.async_engine import GenerationChunk
from fusedserve.engine.errors import EngineError
from fusedserve.engine.request import TokenLogprobs
from fusedserve.server.errors import from_engine_error, generation_aborted, generation_failed, request_timeout
from fusedserve.server.sampling import ChoiceRequest
from fusedserve.server.state import EngineClient

T = TypeVar("T")


@dataclass
class StartedChoice:
    index: int
    first: GenerationChunk
    stream: AsyncIterator[GenerationChunk]


class Deadline:
    """A per-request time limit (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._at = None if seconds is None else asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return max(0.0, self._at - asyncio.get_running_loop().time())

    async def wait_for(self, awaitable: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(awaitable, self.remaining())
        except TimeoutError:
            raise request_timeout(self.seconds or 0.0) from None


def check_chunk(chunk: GenerationChunk) -> GenerationChunk:
    """A chunk that ends its request badly becomes the error the client sees."""
    if chunk.finish_reason == "error":
        raise generation_failed(chunk.error)
    if chunk.finish_reason == "abort":
        raise generation_aborted()
    return chunk


async def _first_chunk(engine: EngineClient, choice: ChoiceRequest) -> StartedChoice:
    stream = aiter(engine.generate(choice.prompt_token_ids, choice.params, choice.request_id))
    try:
        first = check_chunk(await anext(stream))
    except BaseException:
        await stream.aclose()  # type: ignore[attr-defined]
        raise
    return StartedChoice(choice.index, first, stream)


async def start_choices(
    engine: EngineClient, choices: list[ChoiceRequest], deadline: Deadline
) -> list[StartedChoice]:
    """Submit every choice; return once each has its first chunk. On any failure, abort all and raise."""
    tasks = [asyncio.ensure_future(_first_chunk(engine, choice)) for choice in choices]
    try:
        return list(await deadline.wait_for(asyncio.gather(*tasks)))
    except BaseException as error:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await close_all([r for r in results if isinstance(r, StartedChoice)])
        if isinstance(error, EngineError):
            raise from_engine_error(error) from None
        raise


async def close_all(started: list[StartedChoice]) -> None:
    for choice in started:
        await choice.stream.aclose()  # type: ignore[attr-defined]


async def _pump(choice: StartedChoice, queue: asyncio.Queue[tuple[int, GenerationChunk | Exception]]) -> None:
    try:
        queue.put_nowait((choice.index, choice.first))
        if not choice.first.finished:
            async for chunk in choice.stream:
                queue.put_nowait((choice.index, chunk))
                if chunk.finished:
                    break
    except Exception as error:
        queue.put_nowait((choice.index, error))
    finally:
        await choice.stream.aclose()  # type: ignore[attr-defined]


async def merge_choices(
    started: list[StartedChoice], deadline: Deadline
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Yield (index, chunk) for every choice until all are finished; raise OpenAIError on a failed choice."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | Exception]] = asyncio.Queue()
    pumps = [asyncio.ensure_future(_pump(choice, queue)) for choice in started]
    unfinished = len(started)
    try:
        while unfinished:
            index, item = await deadline.wait_for(queue.get())
            if isinstance(item, EngineError):
                raise from_engine_error(item)
            if isinstance(item, Exception):
                raise item
            yield index, check_chunk(item)
            if item.finished:
                unfinished -= 1
    finally:
        for pump in pumps:
            pump.cancel()
        # The pumps close their engine iterators (aborting unfinished requests) as they unwind.
        await asyncio.gather(*pumps, return_exceptions=True)


@dataclass
class ChoiceResult:
    """One finished choice, accumulated from its chunks."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_reason: int | str | None = None
    num_output_tokens: int = 0


async def collect_choices(started: list[StartedChoice], deadline: Deadline) -> list[ChoiceResult]:
    results = {choice.index: ChoiceResult(choice.index) for choice in started}
    parts: dict[int, list[str]] = {choice.index: [] for choice in started}
    async for index, chunk in merge_choices(started, deadline):
        result = results[index]
        parts[index].append(chunk.text)
        result.logprobs.extend(chunk.logprobs)
        result.num_output_tokens = chunk.num_output_tokens
        if chunk.finished:
            result.finish_reason = chunk.finish_reason or "stop"
            result.stop_reason = chunk.stop_reason
    for index, result in results.items():
        result.text = "".join(parts[index])
    return [results[index] for index in sorted(results)]
