"""LaRoSA corpus: calibration and held-out text never share a document; windows are fixed-length token runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fusedserve.engine.larosa.corpus import Document, load_documents, split_documents, token_windows


def test_split_is_deterministic_per_path_and_disjoint() -> None:
    documents = [Document(f"dir/file{i}.rst.txt", f"text {i}") for i in range(200)]
    train, heldout = split_documents(documents)
    assert heldout and train
    assert {d.path for d in train}.isdisjoint({d.path for d in heldout})
    again_train, _ = split_documents(list(reversed(documents)))
    assert {d.path for d in again_train} == {d.path for d in train}


def test_windows_join_documents_with_the_separator_and_stop_at_the_budget() -> None:
    documents = [Document("a", "abc"), Document("b", "defgh"), Document("c", "ijklmnop")]
    windows = token_windows(documents, lambda text: [ord(c) for c in text], 0, seq_len=4, num_tokens=8)
    assert [w.tolist() for w in windows] == [[97, 98, 99, 0], [100, 101, 102, 103]]
    with pytest.raises(ValueError):
        token_windows([Document("a", "ab")], lambda text: [1] * len(text), 0, seq_len=10, num_tokens=10)


def test_load_documents_reads_text_files_only(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "page.rst.txt").write_text("Hello docs")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "empty.txt").write_text("  ")
    assert [d.path for d in load_documents(tmp_path)] == ["sub/page.rst.txt"]
