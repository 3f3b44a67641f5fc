"""The byte-level pre-training corpus: the CPython standard library's .py sources on this machine.

Files are split into train and held-out deterministically by a hash of their path relative to the stdlib root
(so the split is the same on every machine with the same Python), each file's bytes are token ids, and files
are joined with <|endoftext|>. `TokenStream` hands out batches as a pure function of the step, so a resumed
run sees exactly the batches it would have seen, and a grown model can skip the windows its base already saw.
This module never touches models.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusedserve.engine.gstack.byte_tokenizer import EOT_ID

HELDOUT_PER_MILLE = 20


@dataclass(frozen=True)
class CorpusSplit:
    train: np.ndarray  # uint16 token ids
    heldout: np.ndarray
    train_files: int
    heldout_files: int


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_source_files(root: Path) -> list[Path]:
    """Every .py file under `root`, sorted, skipping installed third-party packages."""
    files = [
        p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]
    return sorted(p for p in files if p.is_file())


def is_heldout(relative_path: str, per_mille: int = HELDOUT_PER_MILLE) -> bool:
    digest = hashlib.sha1(relative_path.encode()).hexdigest()
    return int(digest[:8], 16) % 1000 < per_mille


def encode_files(paths: list[Path]) -> np.ndarray:
    """Bytes of each file as token ids, each file followed by <|endoftext|>."""
    eot = np.array([EOT_ID], dtype=np.uint16)
    pieces: list[np.ndarray] = []
    for path in paths:
        pieces.append(np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16))
        pieces.append(eot)
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)


def load_corpus(root: Path | None = None, per_mille: int = HELDOUT_PER_MILLE) -> CorpusSplit:
    root = Path(root) if root is not None else stdlib_root()
    files = list_source_files(root)
    heldout = [p for p in files if is_heldout(p.relative_to(root).as_posix(), per_mille)]
    held = set(heldout)
    train = [p for p in files if p not in held]
    if not train or not heldout:
        raise ValueError(f"corpus under {root} is too small to split ({len(files)} files)")
    return CorpusSplit(encode_files(train), encode_files(heldout), len(train), len(heldout))


@dataclass
class TokenStream:
    """Non-overlapping windows of seq_len + 1 tokens, reshuffled each epoch by a fixed seed.

    Window k of the stream is a pure function of (tokens, seq_len, seed, k); batch `step` with
    `offset_windows` holds windows offset_windows + step*batch_size ... + batch_size - 1.
    """

    tokens: np.ndarray
    seq_len: int
    seed: int = 0
    _orders: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def num_windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)}
        return self._orders[epoch]

    def window(self, k: int) -> np.ndarray:
        epoch, index = divmod(k, self.num_windows)
        start = int(self._order(epoch)[index]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, step: int, batch_size: int, offset_windows: int = 0) -> torch.Tensor:
        first = offset_windows + step * batch_size
        rows = [self.window(first + j) for j in range(batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def heldout_windows(tokens: np.ndarray, seq_len: int, count: int) -> torch.Tensor:
    """`count` evenly spaced windows of seq_len + 1 tokens from the held-out split (fixed for every run)."""
    available = (len(tokens) - 1) // seq_len
    if available < 1:
        raise ValueError("held-out split shorter than one window")
    picks = np.linspace(0, available - 1, num=min(count, available)).astype(np.int64)
    rows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in picks]
    return torch.from_numpy(np.stack(rows).astype(np.int64))
