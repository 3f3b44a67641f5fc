"""Incremental, UTF-8-safe detokenization for streaming: turns each step's new token ids into new text.

Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens, and a token's leading space depends on its
neighbour, so decoding tokens one at a time is wrong. Like vLLM, this keeps two offsets into the token list: text
is decoded over a short window starting at `prefix_offset`, and only what goes beyond the window's already-emitted
part is new. Text ending in U+FFFD (an incomplete character) is held back until the next token completes it.
It only calls `Tokenizer.decode`, so any tokenizer (AdaptiVocab's PatchTokenizer too) works; it never decodes the
whole sequence per token.
"""

from __future__ import annotations

from fusedserve.engine.tokenizer import Tokenizer

# How many tokens before the first new one give enough context for spacing and merged characters.
CONTEXT_TOKENS = 6
REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # window start
        self.read_offset = len(self.token_ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty while a character is still incomplete)."""
        if not new_token_ids:
            return ""
        self.token_ids.extend(new_token_ids)
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing visible yet): wait for more tokens
        if not full_text.startswith(prefix_text):
            # Rare: the new tokens changed how earlier bytes decode; emit only what is visibly new.
            common = _common_prefix_length(prefix_text, full_text)
            delta = full_text[common:]
        else:
            delta = full_text[len(prefix_text) :]
        self._advance()
        return delta

    def _advance(self) -> None:
        # Keep a bounded window: the emitted tokens before read_offset stay only as context.
        self.read_offset = len(self.token_ids)
        self.prefix_offset = max(0, self.read_offset - CONTEXT_TOKENS)
        if self.prefix_offset > 4 * CONTEXT_TOKENS:
            drop = self.prefix_offset
            self.token_ids = self.token_ids[drop:]
            self.prefix_offset -= drop
            self.read_offset -= drop

    def flush(self) -> str:
        """Whatever is still held back when generation ends (an incomplete character decodes as U+FFFD)."""
        if self.read_offset >= len(self.token_ids):
            return ""
        prefix_text = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.token_ids[self.prefix_offset :])
        self._advance()
        return full_text[_common_prefix_length(prefix_text, full_text) :]


def _common_prefix_length(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
