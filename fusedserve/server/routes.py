"""The HTTP routes. Each is a few lines: parse (pydantic), hand over to a serving module, wrap in disconnect
cancellation where the engine does work. No protocol logic lives here.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

import fusedserve
from fusedserve.server.cancellation import cancel_on_disconnect
from fusedserve.server.errors import OpenAIError, model_not_found
from fusedserve.server.prompts import render_chat_prompt
from fusedserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fusedserve.server.responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from fusedserve.server.sampling import check_token_ids
from fusedserve.server.serving_chat import create_chat_completion
from fusedserve.server.serving_completion import create_completion
from fusedserve.server.state import ServerState, server_state

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": "OpenAI error JSON: {error: {message, type, param, code}}"}
    for status in (400, 401, 404, 413, 429, 500, 503)
}


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    return await cancel_on_disconnect(request, create_chat_completion(server_state(request), body))


@router.post("/v1/completions", response_model=CompletionResponse, responses=_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await cancel_on_disconnect(request, create_completion(server_state(request), body))


def _model_card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(
        id=name,
        created=state.created,
        root=state.config.model_root,
        max_model_len=state.engine.max_model_len,
        provenance=state.engine.manifest,
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = server_state(request)
    return ModelList(data=[_model_card(state, name) for name in state.config.served_model_names])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_ERRORS)
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = server_state(request)
    if model_id not in state.config.served_model_names:
        raise model_not_found(model_id)
    return _model_card(state, model_id)


@router.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = server_state(request)
    state.check_model(body.model)
    tokenizer = state.engine.tokenizer
    if body.messages is not None:
        tokens = render_chat_prompt(
            tokenizer,
            body.template_messages(),
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
        )
    else:
        tokens = tokenizer.encode(body.prompt or "")
    token_strs = [tokenizer.token_text(t) for t in tokens] if body.return_token_strs else None
    return TokenizeResponse(
        count=len(tokens), max_model_len=state.engine.max_model_len, tokens=tokens, token_strs=token_strs
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = server_state(request)
    state.check_model(body.model)
    check_token_ids(body.tokens, state.engine.tokenizer.vocab_size, "tokens")
    return DetokenizeResponse(prompt=state.engine.tokenizer.decode(body.tokens))


@router.get("/health", response_model=HealthResponse, responses={503: _ERRORS[503]})
async def health(request: Request) -> Response:
    if not server_state(request).engine.healthy:
        error = OpenAIError(503, "The engine is not running.", code="engine_dead")
        return error.response()
    return JSONResponse(HealthResponse().model_dump())


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    return VersionResponse(version=fusedserve.__version__)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The server's metrics registry: the engine observer's vllm:* and fusedserve:* metrics."""
    return Response(generate_latest(server_state(request).registry), media_type=CONTENT_TYPE_LATEST)
