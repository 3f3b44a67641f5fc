"""Stop strings over streamed text: finds them across delta boundaries and never emits part of one.

Text that could still turn out to be the start of a stop string is held back until the next delta decides it.
The matched stop string is left out of the output unless `include_stop_str_in_output` is set.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StopCheck:
    text: str  # text that may be emitted now
    stopped: bool
    stop_str: str | None = None


class StopStringChecker:
    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self._held = ""
        self._stopped = False

    def push(self, text_delta: str) -> StopCheck:
        if self._stopped:
            return StopCheck("", True)
        if not self.stop:
            return StopCheck(text_delta, False)
        text = self._held + text_delta
        match = self._earliest_match(text)
        if match is not None:
            index, stop_str = match
            end = index + len(stop_str) if self.include_stop_str_in_output else index
            self._held = ""
            self._stopped = True
            return StopCheck(text[:end], True, stop_str)
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return StopCheck(text[: len(text) - keep], False)

    def flush(self) -> str:
        """Release held-back text when generation ends for another reason."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _earliest_match(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop_str in self.stop:
            index = text.find(stop_str)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop_str)
        return best

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop_str in self.stop:
            for length in range(min(len(stop_str) - 1, len(text)), longest, -1):
                if text.endswith(stop_str[:length]):
                    longest = length
                    break
        return longest
