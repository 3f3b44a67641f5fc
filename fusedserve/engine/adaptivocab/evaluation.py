"""Tokenizer-independent quality: bits per byte of held-out text under a causal language model.

bits/byte = (sum over tokens of -log2 p(token | prefix)) / (UTF-8 bytes of the text). Two tokenizers of the
same text are compared fairly because the byte count is the same. The held-out documents are cut into
chunks of at most `max_chars` at paragraph breaks; each chunk is scored on its own after a one-token document
prefix (<|endoftext|>), and every token of the chunk counts. This module only measures; it never trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fusedserve.engine.adaptivocab.corpus import Document


@dataclass(frozen=True)
class BitsPerByte:
    total_bits: float
    total_bytes: int
    total_tokens: int
    chunks: int

    @property
    def bits_per_byte(self) -> float:
        return self.total_bits / max(self.total_bytes, 1)

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / max(self.total_tokens, 1)


def paragraph_chunks(text: str, max_chars: int) -> list[str]:
    """text cut at blank lines into pieces of at most max_chars (a longer paragraph is cut hard)."""
    chunks: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        piece = paragraph + "\n\n"
        while len(piece) > max_chars:
            if current:
                chunks.append(current)
                current = ""
            chunks.append(piece[:max_chars])
            piece = piece[max_chars:]
        if len(current) + len(piece) > max_chars and current:
            chunks.append(current)
            current = ""
        current += piece
    if current.strip():
        chunks.append(current)
    return [c for c in chunks if c.strip()]


def sample_chunks(documents: Sequence[Document], byte_budget: int, max_chars: int = 2000) -> list[str]:
    """About byte_budget bytes of chunks spread evenly over all documents (a fixed stride, deterministic)."""
    chunks = [c for d in documents for c in paragraph_chunks(d.text, max_chars)]
    total = sum(len(c.encode("utf-8")) for c in chunks)
    if total <= byte_budget:
        return chunks
    stride = total / byte_budget
    picked = [chunks[int(i * stride)] for i in range(int(len(chunks) / stride))]
    return picked or chunks[:1]


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    encode: Callable[[str], list[int]],
    chunks: Sequence[str],
    prefix_id: int,
    progress: Callable[[int], None] | None = None,
) -> BitsPerByte:
    """Score every chunk with model (a causal LM returning .logits) under the given tokenizer's encode."""
    model.eval()
    total_nats, total_bytes, total_tokens = 0.0, 0, 0
    for chunk in chunks:
        ids = encode(chunk)
        input_ids = torch.tensor([[prefix_id, *ids]], dtype=torch.long)
        logits = model(input_ids=input_ids).logits[0, :-1].float()
        total_nats += float(torch.nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="sum"))
        total_bytes += len(chunk.encode("utf-8"))
        total_tokens += len(ids)
        if progress is not None:
            progress(1)
    return BitsPerByte(total_nats / math.log(2), total_bytes, total_tokens, len(chunks))
