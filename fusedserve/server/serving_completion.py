"""POST /v1/completions: prompt(s) as text or token ids -> n engine requests per prompt -> response or SSE.

Choice i of prompt p has index p * n + i. `echo` puts the prompt text in front of the first text of each
choice; `logprobs` (an int, completions format) gives token/top columns whose text_offset counts from the
start of the returned text.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

from starlette.responses import Response

from fusedserve.engine.request import TokenLogprobs
from fusedserve.engine.tokenizer import Tokenizer
from fusedserve.server.generation import (
    Deadline,
    StartedChoice,
    collect_choices,
    merge_choices,
    start_choices,
)
from fusedserve.server.logprobs import completion_logprobs
from fusedserve.server.prompts import encode_completion_prompt, prompt_text
from fusedserve.server.protocol import CompletionRequest
from fusedserve.server.responses import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    UsageInfo,
    now,
    random_id,
)
from fusedserve.server.sampling import ChoiceRequest, build_sampling_params, fan_out, resolve_max_tokens
from fusedserve.server.sse import sse_response
from fusedserve.server.state import ServerState


@dataclass
class CompletionContext:
    id: str
    created: int
    model: str
    tokenizer: Tokenizer
    request: CompletionRequest
    num_prompt_tokens: int
    echo_text: dict[int, str] = field(default_factory=dict)  # choice index -> prompt text to echo

    def response(self, choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


async def create_completion(state: ServerState, request: CompletionRequest) -> Response:
    state.check_model(request.model)
    engine = state.engine
    tokenizer = engine.tokenizer
    context = CompletionContext(
        id=random_id("cmpl"),
        created=now(),
        model=state.model_name,
        tokenizer=tokenizer,
        request=request,
        num_prompt_tokens=0,
    )
    choices: list[ChoiceRequest] = []
    for prompt_index, prompt in enumerate(request.prompts()):
        prompt_ids = encode_completion_prompt(tokenizer, prompt)
        max_tokens = resolve_max_tokens(request.max_tokens, len(prompt_ids), engine.max_model_len, "prompt")
        params = build_sampling_params(request, max_tokens, request.logprobs, tokenizer.vocab_size)
        prompt_choices = fan_out(
            context.id, prompt_ids, params, request.n, first_index=prompt_index * request.n
        )
        choices.extend(prompt_choices)
        context.num_prompt_tokens += len(prompt_ids)
        if request.echo:
            text = prompt_text(tokenizer, prompt)
            context.echo_text.update({choice.index: text for choice in prompt_choices})
    deadline = Deadline(state.config.request_timeout)
    started = await start_choices(engine, choices, deadline)
    if request.stream:
        return sse_response(stream_completion(context, started, deadline))
    response = await collect_completion(context, started, deadline)
    return Response(response.model_dump_json(), media_type="application/json")


async def collect_completion(
    context: CompletionContext, started: list[StartedChoice], deadline: Deadline
) -> CompletionResponse:
    results = await collect_choices(started, deadline)
    choices = []
    for result in results:
        prefix = context.echo_text.get(result.index, "")
        logprobs = _logprobs(context, result.logprobs, len(prefix))[0] if _wants_logprobs(context) else None
        choices.append(
            CompletionChoice(
                index=result.index,
                text=prefix + result.text,
                logprobs=logprobs,
                finish_reason=_finish_reason(result.finish_reason),
                stop_reason=result.stop_reason,
            )
        )
    completion_tokens = sum(result.num_output_tokens for result in results)
    return context.response(choices, UsageInfo.of(context.num_prompt_tokens, completion_tokens))


async def stream_completion(
    context: CompletionContext, started: list[StartedChoice], deadline: Deadline
) -> AsyncGenerator[CompletionResponse, None]:
    text_offsets = {choice.index: 0 for choice in started}
    echoed: set[int] = set()
    output_tokens: dict[int, int] = {}
    async for index, chunk in merge_choices(started, deadline):
        output_tokens[index] = chunk.num_output_tokens
        text = chunk.text
        if index not in echoed:
            echoed.add(index)
            text = context.echo_text.get(index, "") + text
            text_offsets[index] = len(text) - len(chunk.text)
        if not (text or chunk.logprobs or chunk.finished):
            continue
        logprobs = None
        if _wants_logprobs(context):
            logprobs, text_offsets[index] = _logprobs(context, chunk.logprobs, text_offsets[index])
        choice = CompletionChoice(
            index=index,
            text=text,
            logprobs=logprobs,
            finish_reason=_finish_reason(chunk.finish_reason) if chunk.finished else None,
            stop_reason=chunk.stop_reason if chunk.finished else None,
        )
        yield context.response([choice])
    if context.request.include_usage:
        yield context.response([], UsageInfo.of(context.num_prompt_tokens, sum(output_tokens.values())))


def _wants_logprobs(context: CompletionContext) -> bool:
    return context.request.logprobs is not None


def _logprobs(
    context: CompletionContext, positions: list[TokenLogprobs], text_offset: int
) -> tuple[CompletionLogprobs, int]:
    return completion_logprobs(context.tokenizer, positions, text_offset)


def _finish_reason(reason: str | None) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"
