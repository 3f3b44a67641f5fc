"""The OpenAI surface of a real `fusedserve serve` (default model), driven with the official openai SDK.

The SDK client validates every response strictly (`_strict_response_validation=True`), except streamed
*completions*: the SDK types a completion chunk's finish_reason as required, so no server's intermediate
chunks (finish_reason null, as OpenAI sends them) pass strict validation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

MESSAGES = [{"role": "user", "content": "Name three colours."}]
FIXED_LENGTH = {"ignore_eos": True}


def greedy_chat(server: RunningServer, max_tokens: int = 12, **kwargs: object):  # noqa: ANN201
    return server.openai().chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=max_tokens, temperature=0, **kwargs
    )


def prompt_token_count(server: RunningServer) -> int:
    return server.http().post("/tokenize", json={"messages": MESSAGES}).json()["count"]


# --- chat ---


def test_chat_completion_returns_text_and_usage(default_server: RunningServer) -> None:
    response = greedy_chat(default_server)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == DEFAULT_MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == prompt_token_count(default_server)
    assert 1 <= response.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_greedy_chat_is_deterministic(default_server: RunningServer) -> None:
    assert (
        greedy_chat(default_server).choices[0].message.content
        == greedy_chat(default_server).choices[0].message.content
    )


def test_max_tokens_ends_with_length(default_server: RunningServer) -> None:
    response = greedy_chat(default_server, max_tokens=5, extra_body=FIXED_LENGTH)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_max_completion_tokens_is_honoured(default_server: RunningServer) -> None:
    response = default_server.openai().chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_completion_tokens=3, extra_body=FIXED_LENGTH
    )
    assert response.usage.completion_tokens == 3


def test_stream_matches_non_stream_and_ends_with_usage_chunk(default_server: RunningServer) -> None:
    expected = greedy_chat(default_server, max_tokens=10, extra_body=FIXED_LENGTH)
    stream = default_server.openai().chat.completions.create(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=FIXED_LENGTH,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == expected.usage
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks[:-1])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == expected.choices[0].message.content
    assert len({chunk.id for chunk in chunks}) == 1


def test_stream_without_usage_option_sends_no_usage_chunk(default_server: RunningServer) -> None:
    stream = default_server.openai().chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4, stream=True
    )
    chunks = list(stream)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_string_cuts_output_before_it(default_server: RunningServer) -> None:
    full = greedy_chat(default_server, max_tokens=16, extra_body=FIXED_LENGTH).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    response = greedy_chat(default_server, max_tokens=16, stop=[stop], extra_body=FIXED_LENGTH)
    choice = response.choices[0]
    assert choice.message.content == full[: full.find(stop)]
    assert choice.finish_reason == "stop"


def test_include_stop_str_in_output_keeps_the_stop_string(default_server: RunningServer) -> None:
    full = greedy_chat(default_server, max_tokens=16, extra_body=FIXED_LENGTH).choices[0].message.content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    extra = {**FIXED_LENGTH, "include_stop_str_in_output": True}
    response = greedy_chat(default_server, max_tokens=16, stop=stop, extra_body=extra)
    assert response.choices[0].message.content == full[: full.find(stop) + len(stop)]


def test_n_choices_are_indexed_and_counted(default_server: RunningServer) -> None:
    response = default_server.openai().chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=6, n=3, seed=5, extra_body=FIXED_LENGTH
    )
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == 18
    assert response.usage.prompt_tokens == prompt_token_count(default_server)


def test_n_choices_stream_every_index(default_server: RunningServer) -> None:
    stream = default_server.openai().chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4, n=2, stream=True, extra_body=FIXED_LENGTH
    )
    finished = {c.index for chunk in stream for c in chunk.choices if c.finish_reason == "length"}
    assert finished == {0, 1}


def test_seed_makes_sampling_reproducible(default_server: RunningServer) -> None:
    def sample(seed: int) -> list[str]:
        response = default_server.openai().chat.completions.create(
            model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=12, temperature=1.0, seed=seed, n=2
        )
        return [choice.message.content or "" for choice in response.choices]

    assert sample(1234) == sample(1234)


def test_chat_logprobs_follow_openai_format(default_server: RunningServer) -> None:
    response = greedy_chat(
        default_server, max_tokens=5, logprobs=True, top_logprobs=3, extra_body=FIXED_LENGTH
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(item.token for item in content) == response.choices[0].message.content
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.bytes == list(item.token.encode())


def test_logit_bias_forces_a_token(default_server: RunningServer) -> None:
    token = default_server.http().post("/tokenize", json={"prompt": " blue"}).json()["tokens"][0]
    response = greedy_chat(
        default_server, max_tokens=4, logit_bias={str(token): 100}, extra_body=FIXED_LENGTH
    )
    assert response.choices[0].message.content == " blue" * 4


def test_min_tokens_delays_the_end(default_server: RunningServer) -> None:
    response = greedy_chat(default_server, max_tokens=12, extra_body={"min_tokens": 12})
    assert response.usage.completion_tokens == 12


def test_stop_token_ids_end_generation(default_server: RunningServer) -> None:
    token = default_server.http().post("/tokenize", json={"prompt": " blue"}).json()["tokens"][0]
    extra = {"stop_token_ids": [token], "ignore_eos": True}
    response = greedy_chat(default_server, max_tokens=8, logit_bias={str(token): 100}, extra_body=extra)
    assert response.choices[0].finish_reason == "stop" and response.choices[0].stop_reason == token
    assert response.usage.completion_tokens == 1


# --- completions ---


def complete(server: RunningServer, prompt: object, **kwargs: object):  # noqa: ANN201
    kwargs.setdefault("max_tokens", 6)
    return server.openai().completions.create(model=DEFAULT_MODEL, prompt=prompt, temperature=0, **kwargs)


def test_completion_from_text(default_server: RunningServer) -> None:
    response = complete(default_server, "The capital of France is", extra_body=FIXED_LENGTH)
    assert response.object == "text_completion"
    assert response.choices[0].text and response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 6


def test_completion_from_token_ids_matches_text_prompt(default_server: RunningServer) -> None:
    text = "The capital of France is"
    ids = default_server.http().post("/tokenize", json={"prompt": text}).json()["tokens"]
    assert complete(default_server, ids).choices[0].text == complete(default_server, text).choices[0].text
    assert complete(default_server, [ids]).usage.prompt_tokens == len(ids)


def test_completion_echo_prepends_the_prompt(default_server: RunningServer) -> None:
    text = "Once upon a time"
    plain = complete(default_server, text).choices[0].text
    assert complete(default_server, text, echo=True).choices[0].text == text + plain


def test_completion_list_of_prompts_indexes_by_prompt_then_choice(default_server: RunningServer) -> None:
    response = complete(default_server, ["One, two,", "Red, green,"], n=2, extra_body=FIXED_LENGTH)
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text == response.choices[1].text  # greedy: both choices of prompt 0 agree
    assert response.usage.completion_tokens == 4 * 6


def test_completion_logprobs_columns(default_server: RunningServer) -> None:
    response = complete(default_server, "One, two,", logprobs=2, extra_body=FIXED_LENGTH)
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == response.choices[0].text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs)


def test_completion_stream_with_usage(default_server: RunningServer) -> None:
    text = "One, two,"
    expected = complete(default_server, text, extra_body=FIXED_LENGTH)
    stream = default_server.openai(strict=False).completions.create(
        model=DEFAULT_MODEL,
        prompt=text,
        max_tokens=6,
        temperature=0,
        stream=True,
        echo=True,
        stream_options={"include_usage": True},
        extra_body=FIXED_LENGTH,
    )
    chunks = list(stream)
    streamed = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert streamed == text + expected.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


# --- models, tokenize, health, version, metrics ---


def test_models_lists_the_served_model(default_server: RunningServer) -> None:
    client = default_server.openai()
    models = client.models.list().data
    assert [model.id for model in models] == [DEFAULT_MODEL]
    assert models[0].owned_by == "fusedserve"
    assert models[0].model_extra["max_model_len"] == 1024
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL


def test_tokenize_detokenize_round_trip(default_server: RunningServer) -> None:
    http = default_server.http()
    tokenized = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 1024
    assert "".join(tokenized["token_strs"]) == "Hello world"
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": "Hello world"}


def test_tokenize_messages_uses_the_chat_template(default_server: RunningServer) -> None:
    http = default_server.http()
    tokens = http.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    text = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert MESSAGES[0]["content"] in text and len(tokens) > 5


def test_health_version_metrics(default_server: RunningServer) -> None:
    http = default_server.http()
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_openapi_schema_lists_the_openai_routes(default_server: RunningServer) -> None:
    paths = httpx.get(f"{default_server.base_url}/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize"} <= set(paths)


def test_cors_is_off_by_default(default_server: RunningServer) -> None:
    response = default_server.http().get("/v1/models", headers={"Origin": "https://app.example"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
