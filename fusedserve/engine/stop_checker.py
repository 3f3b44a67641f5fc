"""Stop strings over a stream of text deltas, for one request.

Text that could still be the beginning of a stop string is held back (the longest suffix that is a prefix of
any stop string) until the next delta decides it, so a stop string split across deltas is still caught and
never partly shown. When several stop strings match, the one that completes first in the stream wins.

It must never emit text past (or, unless include_stop_str_in_output, including) a matched stop string, nor
emit anything after it has stopped. It knows nothing of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopCheck:
    text: str  # the text to emit now
    stopped: bool
    stop_str: str | None = None  # the stop string that matched, when stopped


class StopStringChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""
        self._stop_str: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_str is not None

    def push(self, text_delta: str) -> StopCheck:
        if self._stop_str is not None:
            return StopCheck("", True, self._stop_str)
        if not self.stop:
            return StopCheck(text_delta, False)
        text = self._held + text_delta
        match = self._first_match(text)
        if match is not None:
            start, stop_str = match
            self._held, self._stop_str = "", stop_str
            end = start + len(stop_str) if self.include_stop_str_in_output else start
            return StopCheck(text[:end], True, stop_str)
        keep = self._partial_suffix_length(text)
        self._held = text[len(text) - keep:]
        return StopCheck(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason (nothing once stopped)."""
        held, self._held = self._held, ""
        return "" if self._stop_str is not None else held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first; the earlier start among those ending together."""
        best: tuple[int, int, str] | None = None
        for stop_str in self.stop:
            start = text.find(stop_str)
            if start >= 0:
                candidate = (start + len(stop_str), start, stop_str)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_suffix_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self.stop) - 1)
        for length in range(longest, 0, -1):
            suffix = text[len(text) - length:]
            if any(s.startswith(suffix) for s in self.stop):
                return length
        return 0
