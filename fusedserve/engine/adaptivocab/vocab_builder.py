"""Choosing the domain vocabulary (AdaptiVocab, Algorithm 1): which n-grams get which recycled ids.

Candidates are sequences of 2..max_n original tokens seen in the domain corpus, inside words or across word
boundaries ("Ġof Ġthe"). Each is scored S(t) = F(t) x len(t). One token at a time, the best candidate takes
the id of the least frequent removable original token. The score update is overlap-aware and exact for the
selection-order cover: the corpus keeps a `covered` mask of the occurrences already merged, and choosing t
subtracts, from every candidate occurrence overlapping a newly merged occurrence of t (contained in it,
containing it, or sharing a prefix/suffix) and not overlapping an earlier one, one occurrence (S drops by
len(t')).

Never touched: special tokens, the chat template's tokens, the byte-level base alphabet, tokens without a
merge rule, and the pieces of chosen n-grams. Ids stay in place, so the vocabulary size is unchanged. This
module works on token ids only; it does not read files or models.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from fusedserve.engine.adaptivocab.bpe_vocab import BPEVocab, decompose
from fusedserve.engine.adaptivocab.patch_data import VocabPatch

Ngram = tuple[int, ...]
SEPARATOR = -1


@dataclass(frozen=True)
class BuildConfig:
    replace: int = 10_000
    max_n: int = 3
    min_count: int = 2


@dataclass(frozen=True)
class Selection:
    """One chosen n-gram: the id it took, its pieces, its effective count, and the evicted token's count."""

    token_id: int
    pieces: Ngram
    count: int
    evicted_count: int


class CorpusIndex:
    """The corpus as one flat token list (SEPARATOR between documents) and where each token id occurs."""

    def __init__(self, documents: Iterable[Sequence[int]], max_n: int) -> None:
        tokens = [SEPARATOR]
        for doc in documents:
            tokens.extend(doc)
            tokens.append(SEPARATOR)
        self.tokens: list[int] = tokens + [SEPARATOR] * max_n
        self.array = np.asarray(self.tokens, dtype=np.int64)
        self._order = np.argsort(self.array, kind="stable")
        self._sorted = self.array[self._order]

    @property
    def num_tokens(self) -> int:
        return int((self.array >= 0).sum())

    def unigram_counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(self.array[self.array >= 0], minlength=vocab_size)

    def ngram_counts(self, n: int, excluded: frozenset[int], min_count: int) -> dict[Ngram, int]:
        """Counts of the n-token windows inside one document, without excluded ids, seen min_count times."""
        counts = Counter(zip(*(self.tokens[i:] for i in range(n)), strict=False))
        return {
            gram: c
            for gram, c in counts.items()
            if c >= min_count and min(gram) >= 0 and excluded.isdisjoint(gram)
        }

    def positions_of(self, token_id: int) -> np.ndarray:
        lo = np.searchsorted(self._sorted, token_id, side="left")
        hi = np.searchsorted(self._sorted, token_id, side="right")
        return self._order[lo:hi]

    def occurrences(self, gram: Ngram) -> np.ndarray:
        """Start positions of every occurrence of gram, ascending (overlapping ones included)."""
        positions = self.positions_of(gram[0])
        for offset, token_id in enumerate(gram[1:], start=1):
            positions = positions[self.array[positions + offset] == token_id]
        return positions


class NgramSelector:
    """Scores of the candidates and the merged-occurrence mask; invariant: effective[t] counts t's occurrences
    that overlap no merged occurrence of an earlier choice."""

    def __init__(self, index: CorpusIndex, candidates: dict[Ngram, int], max_n: int) -> None:
        self.index = index
        self.max_n = max_n
        self.effective: dict[Ngram, int] = dict(candidates)
        self.covered = bytearray(len(index.tokens))
        self._heap = [(-len(g) * c, g) for g, c in candidates.items()]
        heapq.heapify(self._heap)

    def score(self, gram: Ngram) -> int:
        return len(gram) * self.effective[gram]

    def pop_best(self, is_allowed: Callable[[Ngram], bool]) -> Ngram | None:
        """The highest-scoring allowed candidate (scores only fall, so stale heap entries are re-pushed)."""
        while self._heap:
            neg_score, gram = heapq.heappop(self._heap)
            current = self.score(gram)
            if current != -neg_score:
                if current > 0:
                    heapq.heappush(self._heap, (-current, gram))
                continue
            if current > 0 and is_allowed(gram):
                return gram
        return None

    def commit(self, gram: Ngram) -> int:
        """Merge gram's free occurrences and discount every candidate occurrence they newly overlap."""
        length = len(gram)
        positions = self.index.occurrences(gram)
        mask = np.frombuffer(self.covered, dtype=np.uint8)
        free = np.ones(len(positions), dtype=bool)
        for offset in range(length):
            free &= mask[positions + offset] == 0
        accepted: list[int] = []
        end = -1
        for p in positions[free].tolist():
            if p >= end:
                accepted.append(p)
                end = p + length
        windows = {
            (s, m)
            for p in accepted
            for m in range(2, self.max_n + 1)
            for s in range(max(p - m + 1, 0), p + length)
        }
        tokens, covered, effective = self.index.tokens, self.covered, self.effective
        for s, m in windows:
            if any(covered[s : s + m]):
                continue
            key = tuple(tokens[s : s + m])
            if key in effective:
                effective[key] -= 1
        del mask
        for p in accepted:
            covered[p : p + length] = b"\x01" * length
        return len(accepted)


def build_vocab_patch(
    documents: Iterable[Sequence[int]],
    bpe: BPEVocab,
    protected_ids: set[int] | frozenset[int],
    config: BuildConfig,
    progress: Callable[[int], None] | None = None,
    excluded_ngrams: frozenset[Ngram] = frozenset(),
) -> tuple[VocabPatch, list[Selection]]:
    """Run the selection on tokenized documents; returns the patch and the choices in order.

    protected_ids are never evicted; excluded_ngrams (the chat template's own n-grams) are never merged.
    """
    if config.max_n < 2:
        raise ValueError("max_n must be at least 2")
    index = CorpusIndex(documents, config.max_n)
    freq = index.unigram_counts(bpe.size)
    candidates: dict[Ngram, int] = {}
    for n in range(2, config.max_n + 1):
        candidates.update(index.ngram_counts(n, bpe.special_ids, config.min_count))
    for gram in excluded_ngrams:
        candidates.pop(gram, None)
    selector = NgramSelector(index, candidates, config.max_n)

    keep = set(protected_ids) | bpe.special_ids | bpe.base_alphabet_ids
    removable = sorted(bpe.removable_ids - keep, key=lambda i: (int(freq[i]), -i))
    removed: set[int] = set()
    new_tokens: dict[int, Ngram] = {}
    selections: list[Selection] = []
    cursor = 0
    while len(new_tokens) < config.replace:
        gram = selector.pop_best(lambda g: removed.isdisjoint(g))
        if gram is None:
            break
        keep.update(gram)
        while cursor < len(removable) and removable[cursor] in keep:
            cursor += 1
        if cursor == len(removable):
            break
        victim = removable[cursor]
        if selector.effective[gram] * (len(gram) - 1) <= int(freq[victim]):
            break  # evicting a token used this often would cost more tokens than the n-gram saves
        cursor += 1
        count = selector.commit(gram)
        removed.add(victim)
        new_tokens[victim] = gram
        selections.append(Selection(victim, gram, count, int(freq[victim])))
        if progress is not None:
            progress(1)

    removed_pieces = {r: decompose(r, bpe.merge_parts, removed) for r in removed}
    saved = sum(s.count * (len(s.pieces) - 1) for s in selections)
    evicted = sum(s.evicted_count * (len(removed_pieces[s.token_id]) - 1) for s in selections)
    total = max(index.num_tokens, 1)
    stats = {
        "train_tokens": index.num_tokens,
        "candidates": len(candidates),
        "estimated_train_reduction": round((saved - evicted) / total, 6),
    }
    patch = VocabPatch(config.max_n, new_tokens, removed_pieces, bpe.size, stats)
    return patch, selections
