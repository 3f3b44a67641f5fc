"""POST /v1/chat/completions: messages -> chat template -> n engine requests -> one response or an SSE stream.

Read top to bottom: validate against the model, start every choice (admission errors become HTTP errors here),
then either collect the choices into a ChatCompletionResponse or stream ChatCompletionChunks: a role chunk per
choice first, content chunks as text arrives, finish_reason on each choice's last chunk, and with
stream_options.include_usage a final chunk with no choices and the usage.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

from starlette.responses import Response

from fusedserve.engine.async_engine import GenerationChunk
from fusedserve.engine.request import TokenLogprobs
from fusedserve.engine.tokenizer import Tokenizer
from fusedserve.server.generation import (
    Deadline,
    StartedChoice,
    collect_choices,
    merge_choices,
    start_choices,
)
from fusedserve.server.logprobs import chat_logprobs
from fusedserve.server.prompts import render_chat_prompt
from fusedserve.server.protocol import ChatCompletionRequest
from fusedserve.server.responses import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
    UsageInfo,
    now,
    random_id,
)
from fusedserve.server.sampling import build_sampling_params, fan_out, resolve_max_tokens
from fusedserve.server.sse import sse_response
from fusedserve.server.state import ServerState


@dataclass
class ChatContext:
    """What every chunk or response of one request shares."""

    id: str
    created: int
    model: str
    tokenizer: Tokenizer
    request: ChatCompletionRequest
    num_prompt_tokens: int
    echo_prefix: str

    def chunk(self, choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest) -> Response:
    state.check_model(request.model)
    engine = state.engine
    prompt_ids = render_chat_prompt(
        engine.tokenizer,
        request.template_messages(),
        request.add_generation_prompt,
        request.continue_final_message,
        request.chat_template_kwargs,
    )
    budget_param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(
        request.requested_max_tokens, len(prompt_ids), engine.max_model_len, "messages", budget_param
    )
    params = build_sampling_params(request, max_tokens, request.engine_logprobs, engine.tokenizer.vocab_size)
    context = ChatContext(
        id=random_id("chatcmpl"),
        created=now(),
        model=state.model_name,
        tokenizer=engine.tokenizer,
        request=request,
        num_prompt_tokens=len(prompt_ids),
        echo_prefix=_echo_prefix(request),
    )
    deadline = Deadline(state.config.request_timeout)
    started = await start_choices(engine, fan_out(context.id, prompt_ids, params, request.n), deadline)
    if request.stream:
        return sse_response(stream_chat(context, started, deadline))
    response = await collect_chat(context, started, deadline)
    return Response(response.model_dump_json(), media_type="application/json")


def _echo_prefix(request: ChatCompletionRequest) -> str:
    """vLLM's chat echo: a final assistant message is repeated at the start of the reply."""
    last = request.messages[-1]
    if not request.echo or last.role != "assistant":
        return ""
    return str(last.template_dict()["content"])


async def collect_chat(
    context: ChatContext, started: list[StartedChoice], deadline: Deadline
) -> ChatCompletionResponse:
    results = await collect_choices(started, deadline)
    choices = [
        ChatChoice(
            index=result.index,
            message=ChatResponseMessage(content=context.echo_prefix + result.text),
            logprobs=_logprobs(context, result.logprobs) if context.request.logprobs else None,
            finish_reason=_finish_reason(result.finish_reason),
            stop_reason=result.stop_reason,
        )
        for result in results
    ]
    completion_tokens = sum(result.num_output_tokens for result in results)
    return ChatCompletionResponse(
        id=context.id,
        created=context.created,
        model=context.model,
        choices=choices,
        usage=UsageInfo.of(context.num_prompt_tokens, completion_tokens),
    )


async def stream_chat(
    context: ChatContext, started: list[StartedChoice], deadline: Deadline
) -> AsyncGenerator[ChatCompletionChunk, None]:
    for choice in started:
        role = DeltaMessage(role="assistant", content=context.echo_prefix)
        yield context.chunk([ChatStreamChoice(index=choice.index, delta=role)])
    output_tokens: dict[int, int] = {}
    async for index, chunk in merge_choices(started, deadline):
        output_tokens[index] = chunk.num_output_tokens
        if chunk.text or chunk.logprobs or chunk.finished:
            yield context.chunk([_stream_choice(context, index, chunk)])
    if context.request.include_usage:
        usage = UsageInfo.of(context.num_prompt_tokens, sum(output_tokens.values()))
        yield context.chunk([], usage=usage)


def _stream_choice(context: ChatContext, index: int, chunk: GenerationChunk) -> ChatStreamChoice:
    return ChatStreamChoice(
        index=index,
        delta=DeltaMessage(content=chunk.text),
        logprobs=_logprobs(context, chunk.logprobs) if context.request.logprobs else None,
        finish_reason=_finish_reason(chunk.finish_reason) if chunk.finished else None,
        stop_reason=chunk.stop_reason if chunk.finished else None,
    )


def _logprobs(context: ChatContext, positions: list[TokenLogprobs]) -> ChatChoiceLogprobs:
    return ChatChoiceLogprobs(content=chat_logprobs(context.tokenizer, positions))


def _finish_reason(reason: str | None) -> Literal["stop", "length"]:
    # Error and abort endings were raised as errors in generation.check_chunk; what is left is stop or length.
    return "length" if reason == "length" else "stop"
