"""Every malformed request to a real server is a 4xx OpenAI error JSON naming the field; never a 5xx."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import RunningServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def assert_openai_error(response: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": 9}, "frequency_penalty"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"seed": 10**30}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 200}}, "logit_bias.5"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": "hi"}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"stop_token_ids": [-1]}, "stop_token_ids[0]"),
        ({"top_k": -5}, "top_k"),
        ({"min_tokens": 5}, "min_tokens"),
        ({"max_tokens": 2000}, "max_tokens"),
        ({"max_completion_tokens": 2000}, "max_completion_tokens"),
    ],
)
def test_invalid_chat_parameter_is_400_naming_it(
    default_server: RunningServer, fields: dict[str, Any], param: str
) -> None:
    assert_openai_error(default_server.http().post(CHAT, json=chat_body(**fields)), 400, param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1] * 1024}, "prompt"),
        ({"prompt": "x", "suffix": "y"}, "suffix"),
        ({"prompt": "x", "echo": True, "logprobs": 1}, "logprobs"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "max_tokens": 1024}, "max_tokens"),
        ({"prompt": "x", "best_of": 4}, "best_of"),
    ],
)
def test_invalid_completion_parameter_is_400_naming_it(
    default_server: RunningServer, fields: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "max_tokens": 2, **fields}
    assert_openai_error(default_server.http().post(COMPLETIONS, json=body), 400, param)


def test_prompt_too_long_error_names_context_length(default_server: RunningServer) -> None:
    error = assert_openai_error(
        default_server.http().post(COMPLETIONS, json={"prompt": [1] * 1000, "max_tokens": 100}),
        400,
        "max_tokens",
    )
    assert error["code"] == "context_length_exceeded" and "1024" in error["message"]


@pytest.mark.parametrize(
    "content",
    [b'{"messages": [', b'{"messages": "\xff\xfe"}', b"[1, 2]", b"", b"null", b'"text"', b"{" * 10000],
)
def test_undecodable_body_is_400(default_server: RunningServer, content: bytes) -> None:
    response = default_server.http().post(CHAT, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_body_over_the_size_cap_is_413(default_server: RunningServer) -> None:
    body = b'{"prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    response = default_server.http().post(
        COMPLETIONS, content=body, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 413)


def test_unknown_model_is_404(default_server: RunningServer) -> None:
    http = default_server.http()
    assert_openai_error(http.post(CHAT, json=chat_body(model="gpt-9")), 404, "model")
    assert_openai_error(http.post(COMPLETIONS, json={"model": "gpt-9", "prompt": "x"}), 404, "model")
    assert_openai_error(http.get("/v1/models/gpt-9"), 404, "model")
    with pytest.raises(openai.NotFoundError):
        default_server.openai().chat.completions.create(model="gpt-9", messages=MESSAGES)


def test_unknown_route_and_method_get_openai_errors(default_server: RunningServer) -> None:
    http = default_server.http()
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get(CHAT), 405)


def test_sdk_raises_bad_request_with_param(default_server: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        default_server.openai().chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3)
    assert info.value.param == "temperature"


GARBAGE_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**70,
    -(2**70),
    1e308,
    "",
    "x" * 5000,
    [],
    [None],
    {},
    {"a": {}},
]
CHAT_FIELDS = [
    "model", "messages", "temperature", "top_p", "n", "max_tokens", "stop", "seed", "logit_bias", "logprobs",
    "top_logprobs", "stream", "stream_options", "presence_penalty", "frequency_penalty", "top_k", "min_p",
    "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "response_format", "user",
]  # fmt: skip


def test_no_garbage_field_value_causes_a_5xx(default_server: RunningServer) -> None:
    http = default_server.http()
    for field in CHAT_FIELDS:
        for value in GARBAGE_VALUES:
            # max_completion_tokens wins over max_tokens: a valid garbage value never asks for long output.
            body = {"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 2, field: value}
            response = http.post(CHAT, json=body)
            assert response.status_code < 500, (field, value, response.text)
            if response.status_code >= 400:
                assert_openai_error(response, response.status_code)
