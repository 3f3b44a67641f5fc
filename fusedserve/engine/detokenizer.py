"""Incremental detokenization: token ids in, text deltas out, one request at a time.

Each new token is decoded together with the tokens of the previous delta (a short window, as vLLM's
prefix_offset/read_offset do), and the delta is the text past the window's old text. The window keeps
tokenizer-dependent spacing right (a SentencePiece word's leading space only survives when it is not first in
a decode) at a cost independent of the sequence length. A delta is held back while the window's text ends in
U+FFFD, the mark of a partial UTF-8 character (byte-level BPE splits emoji and CJK across tokens).

It only calls Tokenizer.decode, works for any Tokenizer, and must never emit part of a multi-byte character
of valid text, nor decode the whole sequence per token.
"""

from __future__ import annotations

from fusedserve.engine.tokenizer import Tokenizer

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded ahead of the first output token (for its leading space)
MAX_HELD_TOKENS = 8  # a partial character longer than this is not one: it is emitted as U+FFFD
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # tokens[prefix_offset:read_offset] produced the last delta; tokens[read_offset:] are not shown yet.
        self._tokens = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        if self._decode(0, self._read_offset).endswith(REPLACEMENT):
            # The prompt ends inside a character: as context it would misalign the first delta.
            self._tokens, self._read_offset = [], 0

    def push(self, new_token_ids: list[int]) -> str:
        """Text that the new tokens complete; may be "" while a character is still partial."""
        deltas = []
        for token_id in new_token_ids:
            self._tokens.append(token_id)
            deltas.append(self._advance(force=False))
        return "".join(deltas)

    def flush(self) -> str:
        """Everything still held back (at the end of generation), partial characters as U+FFFD."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        shown = self._decode(self._prefix_offset, self._read_offset)
        text = self._decode(self._prefix_offset, len(self._tokens))
        held = len(self._tokens) - self._read_offset
        if not force and text.endswith(REPLACEMENT) and held <= MAX_HELD_TOKENS:
            return ""
        delta = text[len(shown):] if text.startswith(shown) else text
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        if self._prefix_offset > 0:  # keep only the window, so memory and work stay bounded
            del self._tokens[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(self._tokens[start:end], skip_special_tokens=self.skip_special_tokens)
