"""From a validated OpenAI request to engine requests: SamplingParams, the length budget, and the n fan-out.

The checks that need the model live here: token ids inside the vocabulary and prompt + max_tokens within
max_model_len (400 naming the field). `n > 1` becomes n engine requests with ids f"{id}-{i}" and, when a seed
is given, seeds seed+i (wrapped into int64), so every choice is reproducible on its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.server.errors import bad_request
from fusedserve.server.protocol import SamplingFields


@dataclass(frozen=True)
class ChoiceRequest:
    """One engine request: the choice index it answers and what to generate."""

    index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


def check_token_ids(token_ids: Iterable[int], vocab_size: int, param: str) -> None:
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise bad_request(
                f"{param}: token id {token_id} is outside the vocabulary [0, {vocab_size})",
                param=param,
                code="invalid_token_id",
            )


def resolve_max_tokens(
    requested: int | None,
    num_prompt_tokens: int,
    max_model_len: int,
    prompt_param: str,
    budget_param: str = "max_tokens",
) -> int:
    """The output budget: what the client asked for if it fits, else a 400 naming the field at fault."""
    if num_prompt_tokens == 0:
        raise bad_request(f"{prompt_param}: the prompt is empty (0 tokens)", param=prompt_param)
    if num_prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{num_prompt_tokens} tokens, which leaves no room for output. "
            f"Please shorten the {prompt_param}.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    room = max_model_len - num_prompt_tokens
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the {prompt_param}, {requested} "
            f"in the completion). Please reduce the length of the {prompt_param} or {budget_param}.",
            param=budget_param,
            code="context_length_exceeded",
        )
    return requested


def build_sampling_params(
    request: SamplingFields, max_tokens: int, logprobs: int | None, vocab_size: int
) -> SamplingParams:
    logit_bias = request.logit_bias_by_id()
    check_token_ids(logit_bias, vocab_size, "logit_bias")
    stop_token_ids = list(request.stop_token_ids or [])
    check_token_ids(stop_token_ids, vocab_size, "stop_token_ids")
    if request.min_tokens > max_tokens:
        raise bad_request(
            f"min_tokens ({request.min_tokens}) must not exceed max_tokens ({max_tokens})", param="min_tokens"
        )
    return SamplingParams(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=max(request.top_k, 0),
        min_p=request.min_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        logit_bias=logit_bias,
        stop=request.stop_list,
        stop_token_ids=stop_token_ids,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=request.skip_special_tokens,
        include_stop_str_in_output=request.include_stop_str_in_output,
    )


def choice_seed(seed: int | None, index: int) -> int | None:
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


def fan_out(
    request_id: str, prompt_token_ids: list[int], params: SamplingParams, n: int, first_index: int = 0
) -> list[ChoiceRequest]:
    """n engine requests for one prompt; choice indices start at `first_index` (for many prompts)."""
    choices = []
    for i in range(n):
        index = first_index + i
        choice_params = replace(params, seed=choice_seed(params.seed, i))
        choices.append(ChoiceRequest(index, f"{request_id}-{index}", list(prompt_token_ids), choice_params))
    return choices
