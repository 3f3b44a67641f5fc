"""Streaming text: UTF-8-safe incremental detokenization and stop strings across delta boundaries."""

from __future__ import annotations

import pytest

from fusedserve.engine.detokenizer import IncrementalDetokenizer
from fusedserve.engine.model.default_model import ensure_default_model
from fusedserve.engine.stop_checker import StopStringChecker
from fusedserve.engine.tokenizer import HFTokenizer

TEXTS = [
    "Hello world! How are you today?",
    "Emoji 👋🏽 and family 👨‍👩‍👧 split over tokens 🎉",
    "日本語のテキストと中文字符",
    "café naïve Ünïcödé — “quotes”",
    "def f(x):\n    return x  # two  spaces\n\n\ttab",
]


@pytest.fixture(scope="module")
def tokenizer() -> HFTokenizer:
    return HFTokenizer(ensure_default_model())


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_concatenate_to_the_full_decode(tokenizer: HFTokenizer, text: str):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Prompt:"))
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_multi_token_pushes_give_the_same_text(tokenizer: HFTokenizer):
    text = " ".join(TEXTS) * 3
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    out = "".join(detok.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + detok.flush()
    assert out == text


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer: HFTokenizer):
    ids = tokenizer.encode("Hi") + [2]  # 2 = <|im_end|>
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    assert skipping.push(ids) + skipping.flush() == "Hi"
    assert keeping.push(ids) + keeping.flush() == "Hi<|im_end|>"


def test_stop_string_split_across_deltas_is_found_and_removed():
    checker = StopStringChecker(["STOP"])
    results = [checker.push(d) for d in ["abc ST", "O", "P tail"]]
    assert [r.text for r in results] == ["abc ", "", ""]
    assert results[-1].stopped and results[-1].stop_str == "STOP"


def test_partial_prefix_is_held_back_then_released_when_it_is_not_a_stop():
    checker = StopStringChecker(["\n\n"])
    first = checker.push("line\n")
    second = checker.push("next")
    assert first.text == "line" and not first.stopped
    assert second.text == "\nnext"


def test_earliest_of_several_stop_strings_wins():
    check = StopStringChecker(["world", "lo w"]).push("hello world")
    assert check.stopped and check.stop_str == "lo w" and check.text == "hel"


def test_include_stop_str_in_output_keeps_the_match():
    check = StopStringChecker(["END"], include_stop_str_in_output=True).push("done END more")
    assert check.text == "done END"


def test_flush_releases_held_text_when_generation_ends_otherwise():
    checker = StopStringChecker(["STOP"])
    assert checker.push("almost ST").text == "almost "
    assert checker.flush() == "ST"


def test_no_stop_strings_passes_text_through():
    assert StopStringChecker([]).push("anything").text == "anything"
