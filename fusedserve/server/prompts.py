"""Turning request inputs into prompt token ids: chat messages through the model's template,
completion prompts as text or token ids. A template or tokenizer that rejects the client's input is a 400,
never a 500.
"""

from __future__ import annotations

from typing import Any

import jinja2

from fusedserve.engine.tokenizer import Tokenizer
from fusedserve.server.errors import bad_request
from fusedserve.server.sampling import check_token_ids


def render_chat_prompt(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template_kwargs: dict[str, Any] | None,
) -> list[int]:
    kwargs = dict(chat_template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except (ValueError, TypeError, KeyError, jinja2.TemplateError) as error:
        raise bad_request(
            f"messages could not be rendered with the chat template: {error}", param="messages"
        ) from None


def encode_completion_prompt(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    check_token_ids(prompt, tokenizer.vocab_size, "prompt")
    return list(prompt)


def prompt_text(tokenizer: Tokenizer, prompt: str | list[int]) -> str:
    """The prompt as text for `echo`: the client's own string, or its token ids decoded."""
    return prompt if isinstance(prompt, str) else tokenizer.decode(prompt, skip_special_tokens=False)
