"""The domain corpus AdaptiVocab adapts to: any directory of text files, split into train and held-out by
file.

The default domain is the Python documentation (reStructuredText sources of Debian's `python3.11-doc`). If the
package is not installed, its .deb is fetched with `apt-get download` and unpacked with `dpkg -x` into the
fusedserve cache; nothing is installed system-wide. The split is a pure function of each file's relative path,
so every command (build, finetune, benchmark) sees the same train and held-out documents. This module never
tokenizes or touches a model.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fusedserve.engine.model.default_model import cache_root

PYTHON_DOCS_NAME = "python3.11-doc"
PYTHON_DOCS_PACKAGE = "python3.11-doc"
PYTHON_DOCS_SOURCES = Path("usr/share/doc/python3.11/html/_sources")
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    """One text file of the corpus: its path relative to the corpus root, and its text."""

    path: str
    text: str


@dataclass(frozen=True)
class CorpusSplit:
    train: list[Document]
    heldout: list[Document]


def python_docs_cache_dir() -> Path:
    return cache_root() / "corpora" / PYTHON_DOCS_NAME


def ensure_python_docs() -> Path:
    """The Python docs sources: the installed package, else the cached unpacked .deb (fetched once)."""
    installed = Path("/") / PYTHON_DOCS_SOURCES
    if installed.is_dir():
        return installed
    cached = python_docs_cache_dir() / PYTHON_DOCS_SOURCES
    if cached.is_dir():
        return cached
    _download_and_unpack(PYTHON_DOCS_PACKAGE, python_docs_cache_dir())
    if not cached.is_dir():
        raise FileNotFoundError(f"{PYTHON_DOCS_PACKAGE} unpacked but {cached} is missing")
    return cached


def _download_and_unpack(package: str, dest: Path) -> None:
    """`apt-get download` a Debian package into a temporary folder and `dpkg -x` it into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fusedserve-deb-") as tmp:
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise RuntimeError(
                f"could not download {package} (run `apt-get update` first?): {result.stderr.strip()[-500:]}"
            )
        unpack = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
        try:
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpack)], check=True)
            for child in unpack.iterdir():
                target = dest / child.name
                if target.exists():
                    shutil.rmtree(target)
                child.rename(target)
        finally:
            shutil.rmtree(unpack, ignore_errors=True)


def resolve_corpus(corpus: str | Path | None) -> Path:
    """A corpus argument to a directory: None or the default name means the Python docs, else the path."""
    if corpus is None or str(corpus) == PYTHON_DOCS_NAME:
        return ensure_python_docs()
    path = Path(corpus)
    if not path.is_dir():
        raise FileNotFoundError(f"corpus directory {path} does not exist")
    return path


def load_documents(root: Path) -> list[Document]:
    """Every UTF-8 text file under root (recursively, sorted by relative path); binary files are skipped."""
    documents = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
        raw = path.read_bytes()
        if b"\x00" in raw:
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            documents.append(Document(path.relative_to(root).as_posix(), text))
    return documents


def is_heldout(relative_path: str, heldout_fraction: float = HELDOUT_FRACTION) -> bool:
    """Deterministic per-file assignment: a stable hash of the path decides, whatever the other files."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def split_documents(documents: list[Document], heldout_fraction: float = HELDOUT_FRACTION) -> CorpusSplit:
    train = [d for d in documents if not is_heldout(d.path, heldout_fraction)]
    heldout = [d for d in documents if is_heldout(d.path, heldout_fraction)]
    if documents and not heldout:
        heldout, train = train[-1:], train[:-1]
    return CorpusSplit(train=train, heldout=heldout)


def load_split(corpus: str | Path | None, heldout_fraction: float = HELDOUT_FRACTION) -> CorpusSplit:
    return split_documents(load_documents(resolve_corpus(corpus)), heldout_fraction)
