"""PatchTokenizer: the engine's tokenizer for a model folder with an AdaptiVocab patch (paper Algorithm 2).

Encoding runs the folder's ORIGINAL tokenizer (special tokens in the text map to their ids there), replaces any
removed token by its decomposition into kept tokens, then merges greedily left to right, longest n-gram first
(k = max_n..2, one dict lookup per k, only at tokens that start some n-gram). Decoding expands every id into
original ids and runs the original decoder, so it works on any window of ids (streaming detokenization).
It never changes the meaning of a kept id: BOS/EOS, specials and template tokens are the original ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusedserve.engine.adaptivocab.patch_data import VocabPatch
from fusedserve.engine.tokenizer import HFTokenizer, Tokenizer


class NgramMerger:
    """Greedy longest-match merging of original-id sequences into patched ids, and its inverse."""

    def __init__(self, patch: VocabPatch) -> None:
        self.max_n = patch.max_n
        self._removed = patch.removed
        self._removed_ids = frozenset(patch.removed)
        self._tables: list[tuple[int, dict[tuple[int, ...], int]]] = []
        for k in range(patch.max_n, 1, -1):
            table = {pieces: token_id for token_id, pieces in patch.new_tokens.items() if len(pieces) == k}
            if table:
                self._tables.append((k, table))
        self._starts = frozenset(pieces[0] for pieces in patch.new_tokens.values())
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
        starts, tables = self._starts, self._tables
        out: list[int] = []
        append = out.append
        i, n = 0, len(ids)
        while i < n:
            token_id = ids[i]
            if token_id in starts:
                for k, table in tables:
                    if i + k <= n:
                        new_id = table.get(tuple(ids[i : i + k]))
                        if new_id is not None:
                            append(new_id)
                            i += k
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
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=False).ids)
        return self._base.encode(text)

    def encode(self, text: str) -> list[int]:
        return self.merger.merge(self.merger.decompose_removed(self.encode_original(text)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the original tokenizer runs them in parallel)."""
        if self._fast is None:
            return [self.encode(t) for t in texts]
        encodings = self._fast.encode_batch(texts, add_special_tokens=False)
        return [self.merger.merge(self.merger.decompose_removed(list(e.ids))) for e in encodings]

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._base.decode(self.merger.expand(list(token_ids)), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self._base.render_chat(messages, add_generation_prompt, **kwargs)
