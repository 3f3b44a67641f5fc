"""Language-model training data for fine-tuning: documents packed into fixed-length sequences, in a fixed
order.

Documents are tokenized with the adapted tokenizer, joined with a separator token and cut into sequences of
seq_len tokens. The sequences used by optimizer step s are a pure function of (seed, s), so a resumed run sees
exactly the data it would have seen without the interruption. This module never touches a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedSequences:
    """Token sequences [num_sequences, seq_len] cut from the concatenated documents."""

    tokens: torch.Tensor

    @property
    def num_sequences(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])


def pack_documents(documents: Sequence[Sequence[int]], separator_id: int, seq_len: int) -> PackedSequences:
    """Concatenate documents, each followed by separator_id, and cut into whole sequences (tail dropped)."""
    stream: list[int] = []
    for doc in documents:
        stream.extend(doc)
        stream.append(separator_id)
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(f"{len(stream)} tokens are fewer than one sequence of {seq_len}")
    tokens = torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
    return PackedSequences(tokens)


def sequence_indices_for_step(num_sequences: int, step: int, per_step: int, seed: int) -> list[int]:
    """Which sequences step uses: consecutive slices of a per-epoch random permutation (seeded by epoch)."""
    indices: list[int] = []
    position = step * per_step
    while len(indices) < per_step:
        epoch, offset = divmod(position, num_sequences)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(num_sequences, generator=generator)
        take = min(per_step - len(indices), num_sequences - offset)
        indices.extend(order[offset : offset + take].tolist())
        position += take
    return indices
