"""What AdaptiVocab needs to know about an original byte-level BPE vocabulary, read from its tokenizer.json.

It answers three questions: which ids are special (added tokens), which ids are the byte-level base alphabet
(single characters of GPT-2's byte-to-unicode map, 'Ġ' for a space), and which merge rule produced each merged
token (so a removed token can be decomposed into smaller ones). It never modifies the tokenizer file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def byte_level_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE uses for raw bytes (GPT-2's bytes_to_unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            chars.append(chr(256 + extra))
            extra += 1
    return frozenset(chars)


@dataclass(frozen=True)
class BPEVocab:
    """The parts of an original BPE tokenizer that vocabulary adaptation reads."""

    vocab: dict[str, int]
    id_to_token: dict[int, str]
    merge_parts: dict[int, tuple[int, int]]
    special_ids: frozenset[int]
    base_alphabet_ids: frozenset[int]

    @property
    def size(self) -> int:
        return max(self.id_to_token) + 1

    @property
    def removable_ids(self) -> frozenset[int]:
        """Tokens that can give up their id: made by a merge rule, not special, not a base-alphabet byte."""
        return frozenset(self.merge_parts) - self.special_ids - self.base_alphabet_ids


def _merge_pair(merge: str | list[str]) -> tuple[str, str]:
    if isinstance(merge, str):
        left, right = merge.split(" ", 1)
        return left, right
    return merge[0], merge[1]


def read_bpe_vocab(tokenizer_json: Path) -> BPEVocab:
    """Parse a Hugging Face tokenizers BPE tokenizer.json (byte-level, like GPT-2, Llama 3 or SmolLM2)."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"AdaptiVocab needs a BPE tokenizer, {tokenizer_json} has {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
    vocab.update(added)
    id_to_token = {i: t for t, i in vocab.items()}
    special_ids = frozenset(added.values())
    merge_parts: dict[int, tuple[int, int]] = {}
    for merge in model.get("merges", []):
        left, right = _merge_pair(merge)
        merged = vocab.get(left + right)
        if merged is not None and merged not in merge_parts and left in vocab and right in vocab:
            merge_parts[merged] = (vocab[left], vocab[right])
    alphabet = byte_level_alphabet()
    base_alphabet_ids = frozenset(i for t, i in vocab.items() if len(t) == 1 and t in alphabet)
    return BPEVocab(vocab, id_to_token, merge_parts, special_ids, base_alphabet_ids)


def decompose(
    token_id: int, merge_parts: dict[int, tuple[int, int]], removed: set[int] | frozenset[int]
) -> tuple[int, ...]:
    """A removed token as a sequence of kept tokens, by undoing merge rules until every piece is kept."""
    if token_id not in removed:
        return (token_id,)
    if token_id not in merge_parts:
        raise ValueError(f"token {token_id} was removed but has no merge rule to decompose it")
    left, right = merge_parts[token_id]
    return decompose(left, merge_parts, removed) + decompose(right, merge_parts, removed)
