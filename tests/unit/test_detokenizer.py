"""IncrementalDetokenizer: deltas add up to the full decode, never split a character, and stay O(1) per token."""

from __future__ import annotations

from typing import Any

import pytest

from fusedserve.engine.detokenizer import MAX_HELD_TOKENS, IncrementalDetokenizer
from fusedserve.engine.model.default_model import ensure_default_model
from fusedserve.engine.tokenizer import HFTokenizer, Tokenizer

MULTI_BYTE = [
    "Emoji 🎉👍🏽 family 👨‍👩‍👧 and flags 🇫🇷 end",
    "中文字符和日本語のテキスト、한국어도",
    "Accents: café, naïve, Ünïcödé, Ångström, señor",
    "Spaces  double   triple\n\nnewlines\n\ttab and trailing  ",
]


@pytest.fixture(scope="module")
def smollm() -> HFTokenizer:
    return HFTokenizer(ensure_default_model())


def stream(tokenizer: Tokenizer, ids: list[int], prompt: list[int] | None = None, step: int = 1,
           skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt or [], skip_special_tokens)
    return [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)] + [detok.flush()]


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_deltas_concatenate_to_the_decode_of_all_ids(smollm: HFTokenizer, text: str):
    ids = smollm.encode(text)
    prompt = smollm.encode_chat([{"role": "user", "content": "Say it."}])
    assert "".join(stream(smollm, ids, prompt)) == smollm.decode(ids)


@pytest.mark.parametrize("text", MULTI_BYTE)
def test_no_delta_contains_a_partial_character(smollm: HFTokenizer, text: str):
    deltas = stream(smollm, smollm.encode(text))
    assert not any("\ufffd" in delta for delta in deltas)


def test_emoji_split_over_byte_tokens_is_held_until_complete(smollm: HFTokenizer):
    ids = smollm.encode("🎉")
    assert len(ids) > 1  # byte-level BPE spreads the 4 bytes over several tokens
    deltas = stream(smollm, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "🎉"


def test_pushing_several_tokens_at_once_gives_the_same_text(smollm: HFTokenizer):
    ids = smollm.encode(" ".join(MULTI_BYTE))
    assert "".join(stream(smollm, ids, step=4)) == "".join(stream(smollm, ids, step=1)) == smollm.decode(ids)


def test_spaces_and_newlines_at_token_boundaries_survive(smollm: HFTokenizer):
    text = "a  b\n c \n\n  d"
    deltas = stream(smollm, smollm.encode(text))
    assert "".join(deltas) == text
    assert len([d for d in deltas if d]) > 3  # it really streamed


def test_special_tokens_follow_skip_special_tokens(smollm: HFTokenizer):
    ids = smollm.encode("Hi") + [2]
    assert "".join(stream(smollm, ids, skip_special_tokens=True)) == "Hi"
    assert "".join(stream(smollm, ids, skip_special_tokens=False)) == "Hi<|im_end|>"


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte; like SentencePiece, a decode drops the leading space of its first token."""

    def __init__(self) -> None:
        self.decoded_lengths: list[int] = []

    @property
    def vocab_size(self) -> int:
        return 256

    @property
    def eos_token_ids(self) -> set[int]:
        return set()

    @property
    def all_special_ids(self) -> set[int]:
        return set()

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_lengths.append(len(token_ids))
        text = bytes(token_ids).decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return ""


def test_any_tokenizer_works_and_leading_spaces_need_the_window():
    tokenizer = ByteTokenizer()
    text = " two words ünd 🎉 more"
    ids = tokenizer.encode(text)
    out = "".join(stream(tokenizer, ids, prompt=tokenizer.encode("prompt")))
    assert out == text  # the first space survives because the prompt tail is decoded ahead of it


def test_work_per_token_is_bounded_by_the_window():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("long text with 🎉 and 中文 " * 200)
    stream(tokenizer, ids)
    assert max(tokenizer.decoded_lengths) <= 8  # never the whole sequence


def test_invalid_bytes_are_released_as_replacement_characters():
    tokenizer = ByteTokenizer()
    ids = [0xF0] * (MAX_HELD_TOKENS + 3) + list(b"ok")
    assert "".join(stream(tokenizer, ids)) == tokenizer.decode(ids)


def test_flush_releases_a_truncated_character():
    tokenizer = ByteTokenizer()
    detok = IncrementalDetokenizer(tokenizer, [], True)
    assert detok.push(list(b"x") + list("🎉".encode())[:2]) == "x"
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""
