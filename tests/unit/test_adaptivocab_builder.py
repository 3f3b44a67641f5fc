"""AdaptiVocab vocabulary selection: cross-word n-grams, ids in place, protected tokens, overlap updates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adaptivocab_helpers import domain_text, write_domain_corpus, write_tiny_tokenizer

from fusedserve.engine.adaptivocab.bpe_vocab import byte_level_alphabet, decompose, read_bpe_vocab
from fusedserve.engine.adaptivocab.build import chat_template_tokens
from fusedserve.engine.adaptivocab.corpus import load_documents, split_documents
from fusedserve.engine.adaptivocab.patch_data import VocabPatch
from fusedserve.engine.adaptivocab.vocab_builder import (
    BuildConfig,
    CorpusIndex,
    NgramSelector,
    build_vocab_patch,
)
from fusedserve.engine.tokenizer import HFTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer = HFTokenizer(folder)
    bpe = read_bpe_vocab(folder / "tokenizer.json")
    docs = [tokenizer.encode(domain_text(seed)) for seed in range(100, 112)]
    template = chat_template_tokens(tokenizer, max_n=3)
    protected = template.ids
    config = BuildConfig(replace=60, max_n=3)
    patch, selections = build_vocab_patch(docs, bpe, protected, config, excluded_ngrams=template.ngrams)
    return {"bpe": bpe, "patch": patch, "sel": selections, "prot": protected, "docs": docs}


def test_byte_level_alphabet_has_256_characters_with_g_for_space() -> None:
    alphabet = byte_level_alphabet()
    assert len(alphabet) == 256 and "Ġ" in alphabet and "Ċ" in alphabet and " " not in alphabet


def test_builder_selects_ngrams_across_word_boundaries(tiny: dict) -> None:
    bpe, patch = tiny["bpe"], tiny["patch"]
    assert patch.replaced == 60
    crossing = [
        pieces
        for pieces in patch.new_tokens.values()
        if any(bpe.id_to_token[p].startswith("Ġ") for p in pieces[1:])
    ]
    assert len(crossing) >= 10, "most frequent domain n-grams span words ('Ġof Ġthe')"


def test_new_tokens_reuse_removed_ids_in_place_and_vocab_size_is_unchanged(tiny: dict) -> None:
    bpe, patch = tiny["bpe"], tiny["patch"]
    assert patch.vocab_size == bpe.size
    assert set(patch.new_tokens) == set(patch.removed)
    assert set(patch.new_tokens) <= bpe.removable_ids
    reused = set(patch.new_tokens)
    for pieces in list(patch.new_tokens.values()) + list(patch.removed.values()):
        assert reused.isdisjoint(pieces)


def test_special_template_and_alphabet_tokens_are_never_replaced(tiny: dict) -> None:
    bpe, patch, protected = tiny["bpe"], tiny["patch"], tiny["prot"]
    reused = set(patch.new_tokens)
    assert reused.isdisjoint(bpe.special_ids)
    assert reused.isdisjoint(bpe.base_alphabet_ids)
    assert protected and reused.isdisjoint(protected)
    for pieces in patch.new_tokens.values():
        assert bpe.special_ids.isdisjoint(pieces)


def test_removed_tokens_decompose_into_kept_tokens_with_the_same_text(tiny: dict) -> None:
    bpe, patch = tiny["bpe"], tiny["patch"]
    for token_id, pieces in patch.removed.items():
        assert "".join(bpe.id_to_token[p] for p in pieces) == bpe.id_to_token[token_id]
        assert decompose(token_id, bpe.merge_parts, set(patch.removed)) == pieces


def test_first_choice_maximises_frequency_times_length(tiny: dict) -> None:
    index = CorpusIndex(tiny["docs"], max_n=3)
    counts = {**index.ngram_counts(2, frozenset(), 2), **index.ngram_counts(3, frozenset(), 2)}
    best_score = max(len(g) * c for g, c in counts.items())
    first = tiny["sel"][0]
    assert len(first.pieces) * counts[first.pieces] == best_score
    assert first.count == counts[first.pieces] or len(set(first.pieces)) < len(first.pieces)


def test_overlap_update_discounts_contained_and_adjacent_ngrams_exactly() -> None:
    docs = [[1, 2, 3] * 4 + [9, 2, 3]]  # "a b c" x4, then "x b c"
    index = CorpusIndex(docs, max_n=3)
    candidates = {}
    for n in (2, 3):
        candidates.update(index.ngram_counts(n, frozenset(), min_count=1))
    selector = NgramSelector(index, candidates, max_n=3)
    best = selector.pop_best(lambda g: True)
    assert best == (1, 2, 3)
    assert selector.commit(best) == 4
    assert selector.effective[(2, 3)] == 1  # only the occurrence after 9 is left
    assert selector.effective[(1, 2)] == 0
    assert selector.effective[(3, 1)] == 0  # straddles two merged occurrences: counted once, now gone
    assert selector.effective[(9, 2, 3)] == 1  # does not overlap a merged occurrence
    assert selector.effective[(3, 9, 2)] == 0  # shares a token with the last merged "a b c"


def test_corpus_split_is_by_file_deterministic_and_skips_binary_files(tmp_path: Path) -> None:
    root = write_domain_corpus(tmp_path / "corpus", files=40)
    docs = load_documents(root)
    assert len(docs) == 40 and all(d.path.endswith(".rst.txt") for d in docs)
    first, second = split_documents(docs, 0.25), split_documents(docs, 0.25)
    assert [d.path for d in first.heldout] == [d.path for d in second.heldout]
    assert {d.path for d in first.train}.isdisjoint(d.path for d in first.heldout)
    assert len(first.train) + len(first.heldout) == 40 and first.heldout


def test_patch_file_round_trips(tiny: dict, tmp_path: Path) -> None:
    patch = tiny["patch"]
    patch.save(tmp_path)
    loaded = VocabPatch.load(tmp_path)
    assert loaded.new_tokens == patch.new_tokens and loaded.removed == patch.removed
    assert loaded.max_n == 3 and loaded.vocab_size == patch.vocab_size
