"""PatchTokenizer: the engine's tokenizer for a model folder with an AdaptiVocab patch (paper Algorithm 2).

Encoding runs the folder's ORIGINAL tokenizer (special tokens in the text map to their ids there), replaces
any removed token by its decomposition into kept tokens, then merges greedily left to right, longest n-gram
first (k = max_n..2, one dict lookup per k, only at tokens that start some n-gram). Long texts are cut where a
non-space character meets a newline (always a pre-token boundary of byte-level BPE, so the original ids are
identical) and encoded in pieces of ~16K characters, which the original tokenizer does faster per byte than
one long string.
Decoding expands every id into original ids and runs the original decoder, so it works on any window of ids
(streaming detokenization). It never changes the meaning of a kept id: BOS/EOS, specials and template tokens
are the original ones.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fusedserve.engine.adaptivocab.patch_data import VocabPatch
from fusedserve.engine.tokenizer import HFTokenizer, Tokenizer

LONG_TEXT_CHARS = 16384
CHUNK_CHARS = 16384  # the original tokenizer is fastest per byte on pieces of this size (measured)
_LINE_END = re.compile(r"(?<=\S)(?=\n)")


def split_at_line_ends(text: str, target_chars: int = CHUNK_CHARS) -> list[str]:
    """text cut before newlines that follow a non-space character, in pieces of about target_chars (joined,
    they are text)."""
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for part in _LINE_END.split(text):
        current.append(part)
        size += len(part)
        if size >= target_chars:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


class NgramMerger:
    """Greedy longest-match merging of original-id sequences into patched ids, and its inverse."""

    def __init__(self, patch: VocabPatch) -> None:
        self.max_n = patch.max_n
        self._removed = patch.removed
        self._removed_ids = frozenset(patch.removed)
        by_first: dict[int, dict[int, dict[tuple[int, ...], int]]] = {}
        for token_id, pieces in patch.new_tokens.items():
            by_first.setdefault(pieces[0], {}).setdefault(len(pieces) - 1, {})[pieces[1:]] = token_id
        # first piece -> [(rest length, {rest pieces: new id})], longest rest first
        self._by_first = {first: sorted(tables.items(), reverse=True) for first, tables in by_first.items()}
        self._padding = [-1] * (patch.max_n - 1)
        self._expansion = dict(patch.new_tokens)

    def decompose_removed(self, ids: list[int]) -> list[int]:
        if self._removed_ids.isdisjoint(ids):
            return ids
        out: list[int] = []
        removed = self._removed
        for token_id in ids:
            pieces = removed.get(token_id)
            if pieces is None:
                out.append(token_id)
            else:
                out.extend(pieces)
        return out

    def merge(self, ids: list[int]) -> list[int]:
        """Original ids (already decomposed) to patched ids."""
        lookup = self._by_first.get
        padded = ids + self._padding  # -1 never matches, so no bounds checks in the loop
        out: list[int] = []
        append = out.append
        i, n = 0, len(ids)
        while i < n:
            token_id = padded[i]
            entry = lookup(token_id)
            if entry is not None:
                for rest_length, table in entry:
                    new_id = table.get(tuple(padded[i + 1 : i + 1 + rest_length]))
                    if new_id is not None:
                        append(new_id)
                        i += rest_length + 1
                        break
                else:
                    append(token_id)
                    i += 1
            else:
                append(token_id)
                i += 1
        return out

    def expand(self, ids: list[int]) -> list[int]:
        """Patched ids to original ids (every reused id becomes its n-gram of kept tokens)."""
        expansion = self._expansion
        out: list[int] = []
        for token_id in ids:
            pieces = expansion.get(token_id)
            if pieces is None:
                out.append(token_id)
            else:
                out.extend(pieces)
        return out


class PatchTokenizer(Tokenizer):
    """The original HF tokenizer of a folder plus its vocabulary patch."""

    def __init__(self, base: HFTokenizer, patch: VocabPatch) -> None:
        self._base = base
        self.patch = patch
        self.merger = NgramMerger(patch)
        self._fast = getattr(base.hf, "backend_tokenizer", None)

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> PatchTokenizer:
        return cls(HFTokenizer(model_dir), VocabPatch.load(Path(model_dir)))

    @property
    def base(self) -> HFTokenizer:
        return self._base

    @property
    def vocab_size(self) -> int:
        return self._base.vocab_size

    @property
    def eos_token_ids(self) -> set[int]:
        return self._base.eos_token_ids

    @property
    def all_special_ids(self) -> set[int]:
        return self._base.all_special_ids

    def encode_original(self, text: str) -> list[int]:
        """The original tokenizer's ids for text (no special tokens added)."""
        if self._fast is None:
            return self._base.encode(text)
        if len(text) <= LONG_TEXT_CHARS:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        fast = self._fast
        return [i for piece in split_at_line_ends(text) for i in fast.encode(piece, add_special_tokens=False).ids]

    def encode(self, text: str) -> list[int]:
        return self.merger.merge(self.merger.decompose_removed(self.encode_original(text)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (each is merged on its own; n-grams never span two texts)."""
        return [self.encode(text) for text in texts]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._base.decode(self.merger.expand(list(token_ids)), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self._base.render_chat(messages, add_generation_prompt, **kwargs)
