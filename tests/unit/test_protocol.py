"""Request validation without an engine: every malformed request becomes a 400 naming the field at fault."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fusedserve.server.errors import OpenAIError, from_validation_errors, param_path
from fusedserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from fusedserve.server.sampling import build_sampling_params, choice_seed, fan_out, resolve_max_tokens

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def rejected(model: type, body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    error = from_validation_errors(info.value.errors())
    assert error.status_code == 400
    assert error.body()["error"]["type"] == "invalid_request_error"
    return error


def chat_rejected(**fields: Any) -> OpenAIError:
    return rejected(ChatCompletionRequest, {"model": "m", "messages": MESSAGES, **fields})


def test_minimal_chat_request_gets_openai_defaults() -> None:
    request = chat()
    assert request.n == 1 and request.temperature is None and request.stream is False
    assert request.requested_max_tokens is None and request.engine_logprobs is None
    assert request.stop_list == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("presence_penalty", 2.1),
        ("frequency_penalty", -3),
        ("n", 0),
        ("n", 129),
        ("max_tokens", 0),
        ("max_completion_tokens", -5),
        ("seed", 2**64),
        ("top_logprobs", 21),
        ("min_p", 1.5),
        ("repetition_penalty", 0.0),
        ("top_k", -2),
        ("min_tokens", -1),
    ],
)
def test_out_of_range_value_names_its_field(field: str, value: Any) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    assert chat_rejected(**{field: value}, **extra).param == field


@pytest.mark.parametrize(
    ("field", "value"), [("temperature", "0.5"), ("stream", "true"), ("n", 1.5), ("max_tokens", "10")]
)
def test_wrong_json_type_is_rejected_not_coerced(field: str, value: Any) -> None:
    assert chat_rejected(**{field: value}).param == field


def test_non_finite_float_is_rejected() -> None:
    assert chat_rejected(temperature=float("nan")).param == "temperature"
    assert chat_rejected(top_p=float("inf")).param == "top_p"


def test_unknown_field_is_rejected_like_openai() -> None:
    error = chat_rejected(frobnicate=1)
    assert error.param == "frobnicate"
    assert "Unrecognized request argument" in error.message


def test_more_than_four_stop_sequences_rejected() -> None:
    assert chat_rejected(stop=["a", "b", "c", "d", "e"]).param == "stop"
    assert chat(stop=["a", "b", "c", "d"]).stop_list == ["a", "b", "c", "d"]


def test_stop_string_becomes_a_list() -> None:
    assert chat(stop="###").stop_list == ["###"]


def test_empty_stop_string_rejected() -> None:
    assert chat_rejected(stop="").param == "stop"


def test_stop_of_wrong_type_reports_stop_not_union_tags() -> None:
    error = chat_rejected(stop=3)
    assert error.param == "stop"
    assert "str" not in (error.param or "")


def test_logit_bias_keys_must_be_token_ids() -> None:
    assert chat_rejected(logit_bias={"hello": 1.0}).param == "logit_bias"
    assert chat_rejected(logit_bias={"-3": 1.0}).param == "logit_bias"


def test_logit_bias_values_within_plus_minus_100() -> None:
    assert chat_rejected(logit_bias={"5": 101.0}).param is not None
    assert chat(logit_bias={"5": -100}).logit_bias_by_id() == {5: -100.0}


def test_stream_options_without_stream_rejected() -> None:
    error = chat_rejected(stream_options={"include_usage": True})
    assert error.param == "stream_options"
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage


def test_top_logprobs_requires_logprobs() -> None:
    assert chat_rejected(top_logprobs=3).param == "top_logprobs"
    assert chat(logprobs=True, top_logprobs=3).engine_logprobs == 3
    assert chat(logprobs=True).engine_logprobs == 0


def test_empty_messages_rejected() -> None:
    assert rejected(ChatCompletionRequest, {"messages": []}).param == "messages"


def test_missing_messages_rejected() -> None:
    assert rejected(ChatCompletionRequest, {"model": "m"}).param == "messages"


def test_invalid_role_names_the_message() -> None:
    error = rejected(ChatCompletionRequest, {"messages": [{"role": "wizard", "content": "x"}]})
    assert error.param == "messages[0].role"


def test_tool_role_is_not_accepted() -> None:
    body = {"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}
    assert rejected(ChatCompletionRequest, body).param is not None


def test_text_content_parts_are_joined_and_developer_reads_as_system() -> None:
    request = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]
    )
    assert request.template_messages() == [{"role": "system", "content": "a\nb"}]


def test_image_content_part_rejected() -> None:
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert rejected(ChatCompletionRequest, body).param is not None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=5, max_completion_tokens=7).requested_max_tokens == 7


def test_continue_final_message_needs_assistant_last_and_no_generation_prompt() -> None:
    assert chat_rejected(continue_final_message=True).param == "continue_final_message"
    messages = [*MESSAGES, {"role": "assistant", "content": "Once"}]
    assert chat_rejected(messages=messages, continue_final_message=True).param == "continue_final_message"
    assert chat(
        messages=messages, continue_final_message=True, add_generation_prompt=False
    ).continue_final_message


def test_response_format_other_than_text_rejected() -> None:
    assert chat_rejected(response_format={"type": "json_object"}).param is not None
    assert chat(response_format={"type": "text"}).response_format is not None


# --- completions ---


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", **fields})


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    assert completion(prompt=prompt).prompts() == expected


def test_completion_max_tokens_defaults_to_16_like_openai() -> None:
    assert completion(prompt="x").max_tokens == 16


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], None, 5])
def test_malformed_completion_prompt_rejected(prompt: Any) -> None:
    assert rejected(CompletionRequest, {"prompt": prompt}).param is not None


def test_suffix_rejected() -> None:
    assert rejected(CompletionRequest, {"prompt": "x", "suffix": "y"}).param == "suffix"


def test_echo_with_logprobs_rejected() -> None:
    assert rejected(CompletionRequest, {"prompt": "x", "echo": True, "logprobs": 1}).param == "logprobs"


def test_best_of_other_than_n_rejected() -> None:
    assert rejected(CompletionRequest, {"prompt": "x", "best_of": 3}).param == "best_of"
    assert completion(prompt="x", n=2, best_of=2).best_of == 2


def test_completion_logprobs_bounds() -> None:
    assert rejected(CompletionRequest, {"prompt": "x", "logprobs": 21}).param == "logprobs"
    assert completion(prompt="x", logprobs=0).logprobs == 0


# --- tokenize ---


def test_tokenize_takes_prompt_or_messages_not_both() -> None:
    assert TokenizeRequest.model_validate({"prompt": "hi"}).prompt == "hi"
    assert TokenizeRequest.model_validate({"messages": MESSAGES}).template_messages()[0]["content"] == "hi"
    assert rejected(TokenizeRequest, {}).param == "messages"
    assert rejected(TokenizeRequest, {"prompt": "a", "messages": MESSAGES}).param == "messages"


def test_detokenize_needs_non_negative_ids() -> None:
    assert rejected(DetokenizeRequest, {"tokens": [1, -2]}).param == "tokens[1]"


LONE = "\ud800"  # a lone UTF-16 surrogate, as JSON's "\\ud800" escape decodes


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (CompletionRequest, {"prompt": f"a{LONE}b"}, "prompt"),
        (CompletionRequest, {"prompt": ["ok", LONE]}, "prompt"),
        (CompletionRequest, {"prompt": "x", "model": LONE}, "model"),
        (CompletionRequest, {"prompt": "x", "stop": [LONE]}, "stop"),
        (ChatCompletionRequest, {"messages": [{"role": "user", "content": LONE}]}, "messages[0].content"),
        (ChatCompletionRequest, {"messages": MESSAGES, "chat_template_kwargs": {LONE: 1}}, "chat_template_kwargs"),
        (TokenizeRequest, {"prompt": LONE}, "prompt"),
    ],
)
def test_lone_surrogate_in_any_text_is_rejected(model: type, body: dict[str, Any], param: str) -> None:
    error = rejected(model, body)
    assert error.param == param and "surrogate" in error.message


def test_surrogate_pair_decoded_to_one_character_is_accepted() -> None:
    assert completion(prompt="smile \U0001f600").prompt == "smile \U0001f600"


# --- error paths and engine-facing checks ---


def test_param_path_drops_body_prefix_and_union_tags() -> None:
    assert param_path(("body", "messages", 0, "role")) == "messages[0].role"
    assert param_path(("body", "stop", "list[str]", 2)) == "stop[2]"
    assert param_path(("body",)) is None


def test_invalid_json_error_has_no_param() -> None:
    error = from_validation_errors([{"type": "json_invalid", "loc": ("body", 3), "ctx": {"error": "bad"}}])
    assert error.status_code == 400 and error.param is None and "JSON" in error.message


def test_prompt_plus_max_tokens_over_limit_names_max_tokens() -> None:
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(100, 30, 120, "messages")
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    assert info.value.code == "context_length_exceeded"


def test_prompt_alone_over_limit_names_the_prompt_field() -> None:
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(None, 120, 120, "prompt")
    assert info.value.param == "prompt"


def test_max_tokens_defaults_to_the_room_left() -> None:
    assert resolve_max_tokens(None, 30, 120, "messages") == 90
    assert resolve_max_tokens(90, 30, 120, "messages") == 90


def test_empty_prompt_rejected() -> None:
    with pytest.raises(OpenAIError) as info:
        resolve_max_tokens(None, 0, 120, "prompt")
    assert info.value.param == "prompt"


def test_sampling_params_carry_every_field() -> None:
    request = chat(
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repetition_penalty=1.1,
        logit_bias={"3": 2.0},
        stop=["x"],
        stop_token_ids=[4],
        min_tokens=2,
        ignore_eos=True,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )
    params = build_sampling_params(request, max_tokens=10, logprobs=2, vocab_size=100)
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (
        0.5,
        0.9,
        5,
        0.1,
        7,
    )
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert params.logit_bias == {3: 2.0} and params.stop == ["x"] and params.stop_token_ids == [4]
    assert (params.max_tokens, params.min_tokens, params.ignore_eos, params.logprobs) == (10, 2, True, 2)
    assert params.skip_special_tokens is False and params.include_stop_str_in_output is True


def test_unset_temperature_and_top_k_mean_defaults() -> None:
    params = build_sampling_params(chat(), max_tokens=10, logprobs=None, vocab_size=100)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0


@pytest.mark.parametrize(("field", "value"), [("logit_bias", {"100": 1.0}), ("stop_token_ids", [100])])
def test_token_ids_outside_vocabulary_rejected(field: str, value: Any) -> None:
    with pytest.raises(OpenAIError) as info:
        build_sampling_params(chat(**{field: value}), max_tokens=10, logprobs=None, vocab_size=100)
    assert info.value.param == field


def test_min_tokens_above_max_tokens_rejected() -> None:
    with pytest.raises(OpenAIError) as info:
        build_sampling_params(chat(min_tokens=20), max_tokens=10, logprobs=None, vocab_size=100)
    assert info.value.param == "min_tokens"


def test_fan_out_gives_each_choice_its_own_id_and_seed() -> None:
    params = build_sampling_params(chat(seed=41), max_tokens=4, logprobs=None, vocab_size=100)
    choices = fan_out("chatcmpl-x", [1, 2], params, n=3)
    assert [c.request_id for c in choices] == ["chatcmpl-x-0", "chatcmpl-x-1", "chatcmpl-x-2"]
    assert [c.params.seed for c in choices] == [41, 42, 43]
    assert params.seed == 41


def test_fan_out_indices_for_second_prompt_start_after_the_first() -> None:
    params = build_sampling_params(completion(prompt="x"), max_tokens=4, logprobs=None, vocab_size=100)
    assert [c.index for c in fan_out("cmpl-x", [1], params, n=2, first_index=2)] == [2, 3]


def test_choice_seed_wraps_into_int64() -> None:
    assert choice_seed(2**63 - 1, 1) == -(2**63)
    assert choice_seed(None, 3) is None
