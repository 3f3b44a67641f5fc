"""The vocabulary patch: the record a build produces and a PatchTokenizer reads, and its file in a model
folder.

A patch says, for every reused id, which sequence of original tokens the new token stands for, and how the
original token that used to own that id is decomposed into kept tokens. All other ids keep their meaning, so
the vocabulary size, BOS/EOS and chat-template ids are unchanged. This module only stores and checks the
record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

PATCH_FILE = "adaptivocab_patch.json"
PATCH_FORMAT = 1


@dataclass(frozen=True)
class VocabPatch:
    """new_tokens: reused id -> the kept original ids it merges; removed: that id's old token -> kept ids."""

    max_n: int
    new_tokens: dict[int, tuple[int, ...]]
    removed: dict[int, tuple[int, ...]]
    vocab_size: int
    stats: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.new_tokens) != set(self.removed):
            raise ValueError("every reused id must be both a new token and a removed original token")
        reused = set(self.new_tokens)
        for token_id, pieces in list(self.new_tokens.items()) + list(self.removed.items()):
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"id {token_id} is outside the vocabulary of {self.vocab_size}")
            if reused.intersection(pieces):
                raise ValueError(f"id {token_id} maps to a reused id: pieces must be kept original tokens")
        for token_id, pieces in self.new_tokens.items():
            if not 2 <= len(pieces) <= self.max_n:
                raise ValueError(f"new token {token_id} has {len(pieces)} pieces, expected 2..{self.max_n}")

    @property
    def replaced(self) -> int:
        return len(self.new_tokens)

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / PATCH_FILE
        data = {
            "format": PATCH_FORMAT,
            "max_n": self.max_n,
            "vocab_size": self.vocab_size,
            "stats": self.stats,
            "new_tokens": {str(i): list(p) for i, p in self.new_tokens.items()},  # in selection order
            "removed": {str(i): list(p) for i, p in sorted(self.removed.items())},
        }
        path.write_text(json.dumps(data, indent=1))
        return path

    @classmethod
    def load(cls, model_dir: Path) -> VocabPatch:
        data = json.loads((Path(model_dir) / PATCH_FILE).read_text())
        if data.get("format") != PATCH_FORMAT:
            raise ValueError(f"unknown AdaptiVocab patch format {data.get('format')!r}")
        return cls(
            max_n=int(data["max_n"]),
            new_tokens={int(i): tuple(p) for i, p in data["new_tokens"].items()},
            removed={int(i): tuple(p) for i, p in data["removed"].items()},
            vocab_size=int(data["vocab_size"]),
            stats=dict(data.get("stats", {})),
        )
