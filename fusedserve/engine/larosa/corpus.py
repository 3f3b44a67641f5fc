"""Real text for LaRoSA calibration and evaluation: documents from a directory, split by a hash of each path.

The default corpus is the Python documentation (reStructuredText sources of Debian's python3.11-doc: English
technical prose), located or fetched by the AdaptiVocab corpus module (one copy of the fetching code for both
techniques). Any directory of text files works too. The
calibration set comes from the train split, perplexity from the held-out split, so they never share a document.
This module never runs a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedserve.engine.adaptivocab.corpus import resolve_corpus as resolve_shared_corpus
from fusedserve.engine.tokenizer import Tokenizer

PYTHON_DOCS = "python-docs"
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".py")
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    path: str  # relative to the corpus root; decides the split
    text: str


def resolve_corpus(corpus: str | Path | None) -> Path:
    """A corpus argument to a directory; "python-docs" (or None) is the shared Python-docs corpus."""
    if corpus is not None and str(corpus) == PYTHON_DOCS:
        corpus = None
    return resolve_shared_corpus(corpus)


def load_documents(root: Path) -> list[Document]:
    """Every UTF-8 text file under root with a text suffix, sorted by relative path."""
    documents = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)):
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            documents.append(Document(path.relative_to(root).as_posix(), text))
    return documents


def is_heldout(relative_path: str, fraction: float = HELDOUT_FRACTION) -> bool:
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(documents: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held-out); deterministic per path."""
    train = [doc for doc in documents if not is_heldout(doc.path)]
    heldout = [doc for doc in documents if is_heldout(doc.path)]
    return train, heldout


def token_windows(
    documents: list[Document],
    encode: Callable[[str], list[int]],
    separator_id: int,
    seq_len: int,
    num_tokens: int,
) -> list[torch.Tensor]:
    """Consecutive windows of seq_len tokens from the documents joined by `separator_id`, num_tokens in all."""
    num_windows = max(1, num_tokens // seq_len)
    needed = num_windows * seq_len
    stream: list[int] = []
    for doc in documents:
        stream.extend(encode(doc.text))
        stream.append(separator_id)
        if len(stream) >= needed:
            break
    if len(stream) < seq_len:
        raise ValueError(f"corpus has only {len(stream)} tokens, fewer than one window of {seq_len}")
    ids = torch.tensor(stream[: (len(stream) // seq_len) * seq_len][:needed], dtype=torch.long)
    return list(ids.view(-1, seq_len))


def corpus_windows(
    corpus: str | Path | None, tokenizer: Tokenizer, split: str, seq_len: int, num_tokens: int
) -> list[torch.Tensor]:
    """Token windows of the train or held-out split of a corpus, tokenized as the model folder asks
    (engine.tokenizer.load_tokenizer: the HF tokenizer, or AdaptiVocab's PatchTokenizer)."""
    train, heldout = split_documents(load_documents(resolve_corpus(corpus)))
    documents = train if split == "train" else heldout
    separator = min(tokenizer.eos_token_ids, default=0)
    return token_windows(documents, tokenizer.encode, separator, seq_len, num_tokens)
