"""Engine logprobs (TokenLogprobs) in the two OpenAI formats: chat's per-token records, completions' columns.

JSON has no -inf: a logprob below -9999 (a token masked by top-k or a logit bias of -100) is reported as
-9999, as vLLM does.
"""

from __future__ import annotations

import math

from fusedserve.engine.request import TokenLogprobs
from fusedserve.engine.tokenizer import Tokenizer
from fusedserve.server.responses import ChatTokenLogprob, ChatTopLogprob, CompletionLogprobs

MIN_LOGPROB = -9999.0


def finite_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) else max(value, MIN_LOGPROB)


def _chat_top(tokenizer: Tokenizer, token_id: int, logprob: float) -> ChatTopLogprob:
    token = tokenizer.token_text(token_id)
    return ChatTopLogprob(token=token, logprob=finite_logprob(logprob), bytes=list(token.encode("utf-8")))


def chat_logprobs(tokenizer: Tokenizer, positions: list[TokenLogprobs]) -> list[ChatTokenLogprob]:
    records = []
    for position in positions:
        chosen = _chat_top(tokenizer, position.token_id, position.logprob)
        top = [_chat_top(tokenizer, token_id, logprob) for token_id, logprob in position.top]
        records.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return records


def completion_logprobs(
    tokenizer: Tokenizer, positions: list[TokenLogprobs], text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """Columns for these positions, offsets counted from `text_offset`; returns them and the next offset."""
    columns = CompletionLogprobs()
    for position in positions:
        token = tokenizer.token_text(position.token_id)
        columns.tokens.append(token)
        columns.token_logprobs.append(finite_logprob(position.logprob))
        top = {tokenizer.token_text(token_id): finite_logprob(lp) for token_id, lp in position.top}
        top.setdefault(token, finite_logprob(position.logprob))
        columns.top_logprobs.append(top)
        columns.text_offset.append(text_offset)
        text_offset += len(token)
    return columns, text_offset


def extend_completion_logprobs(into: CompletionLogprobs, more: CompletionLogprobs) -> None:
    into.tokens.extend(more.tokens)
    into.token_logprobs.extend(more.token_logprobs)
    into.top_logprobs.extend(more.top_logprobs)
    into.text_offset.extend(more.text_offset)
