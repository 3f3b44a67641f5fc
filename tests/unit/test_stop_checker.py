"""StopStringChecker: stop strings across delta boundaries, partial-prefix hold-back, several stops, flush."""

from __future__ import annotations

from fusedserve.engine.stop_checker import StopStringChecker


def run(stop: list[str], deltas: list[str], include: bool = False) -> tuple[str, StopStringChecker]:
    checker = StopStringChecker(stop, include)
    return "".join(checker.push(d).text for d in deltas), checker


def test_stop_string_spanning_three_deltas_is_cut_out():
    checker = StopStringChecker(["<END>"], False)
    results = [checker.push(d) for d in ["Hello <", "EN", "D> ignored"]]
    assert [r.text for r in results] == ["Hello ", "", ""]
    assert [r.stopped for r in results] == [False, False, True]
    assert results[-1].stop_str == "<END>"


def test_text_that_may_start_a_stop_string_is_held_back():
    checker = StopStringChecker(["###"], False)
    assert checker.push("abc#").text == "abc"
    assert checker.push("#").text == ""
    assert checker.push("x").text == "##x"  # "##x" cannot start "###": released


def test_only_the_longest_possible_prefix_is_held():
    checker = StopStringChecker(["abab"], False)
    assert checker.push("xxaba").text == "xx"  # "aba" could still become "abab"
    assert checker.push("c").text == "abac"


def test_stop_string_inside_a_single_delta_truncates_it():
    text, checker = run(["\n\n"], ["first line\n\nsecond"])
    assert text == "first line" and checker.stopped


def test_include_stop_str_in_output_keeps_the_stop_string():
    text, _ = run(["<END>"], ["Hello <EN", "D> ignored"], include=True)
    assert text == "Hello <END>"


def test_of_several_stop_strings_the_first_to_complete_wins():
    checker = StopStringChecker(["world", "o w", "zzz"], False)
    check = checker.push("hello world")
    assert check.stop_str == "o w" and check.text == "hell"


def test_stop_strings_ending_together_prefer_the_earlier_start():
    check = StopStringChecker(["bc", "abc"], False).push("xabcd")
    assert check.stop_str == "abc" and check.text == "x"


def test_nothing_is_emitted_after_stopping():
    checker = StopStringChecker(["STOP"], False)
    checker.push("a STOP b")
    later = checker.push("more text")
    assert later.text == "" and later.stopped and later.stop_str == "STOP"
    assert checker.flush() == ""


def test_flush_releases_held_text_when_generation_ends_otherwise():
    checker = StopStringChecker(["STOP"], False)
    assert checker.push("almost ST").text == "almost "
    assert checker.flush() == "ST"
    assert checker.flush() == ""


def test_without_stop_strings_text_passes_through_untouched():
    text, checker = run([], ["a", "b\n", "c"])
    assert text == "ab\nc" and not checker.stopped
    text, _ = run([""], ["x"])  # an empty stop string matches nothing
    assert text == "x"


def test_unicode_stop_strings_work_across_deltas():
    text, checker = run(["🛑"], ["go 中文 ", "🛑 no"])
    assert text == "go 中文 " and checker.stopped
