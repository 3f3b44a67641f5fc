"""`fusedserve adaptivocab build`: a model folder + a domain corpus -> an adapted model folder.

Steps: tokenize the corpus's train split with the original tokenizer; choose the n-grams (vocab_builder);
initialise their embeddings (embeddings); write the folder with the original tokenizer files, the patch,
untied weights and a manifest entry that records the parameters and the token reduction measured on the
held-out split. It never fine-tunes (finetune.py does) and never overwrites its source folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedserve.engine.adaptivocab.corpus import HELDOUT_FRACTION, Document, load_split, resolve_corpus
from fusedserve.engine.adaptivocab.patch_data import PATCH_FILE, VocabPatch

MANIFEST_KEY = "adaptivocab"


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path
    corpus: str | None
    out: Path
    replace: int = 10_000
    max_n: int = 3
    min_count: int = 2
    heldout_fraction: float = HELDOUT_FRACTION


TEMPLATE_PROBES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": ""}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "tool", "content": ""}],
]


@dataclass(frozen=True)
class TemplateTokens:
    """What the chat template itself emits: its token ids (never evicted) and its n-grams (never merged)."""

    ids: frozenset[int]
    ngrams: frozenset[tuple[int, ...]]


def chat_template_tokens(tokenizer: Any, max_n: int) -> TemplateTokens:
    """Render the template around empty messages and collect its ids and its 2..max_n-grams."""
    ids: set[int] = set()
    ngrams: set[tuple[int, ...]] = set()
    for messages in TEMPLATE_PROBES:
        try:
            encoded = tokenizer.encode(tokenizer.render_chat(messages, add_generation_prompt=True))
        except Exception:  # noqa: BLE001 - a template may reject a role; the other probes still count
            continue
        ids.update(encoded)
        for n in range(2, max_n + 1):
            ngrams.update(tuple(encoded[i : i + n]) for i in range(len(encoded) - n + 1))
    return TemplateTokens(frozenset(ids), frozenset(ngrams))


def count_tokens(texts: list[str], encode_batch: Any) -> list[int]:
    return [len(ids) for ids in encode_batch(texts)]


def measure_reduction(heldout: list[Document], patched: Any) -> dict[str, float | int]:
    """Held-out token counts with the original and the patched tokenizer."""
    texts = [d.text for d in heldout]
    original = sum(len(patched.encode_original(t)) for t in texts)
    adapted = sum(count_tokens(texts, patched.encode_batch))
    return {
        "heldout_documents": len(texts),
        "heldout_tokens_original": original,
        "heldout_tokens_adapted": adapted,
        "token_reduction": round(1.0 - adapted / max(original, 1), 6),
    }


def run_build(request: BuildRequest, show_progress: bool = True) -> dict[str, Any]:
    """Build the adapted folder at request.out and return its manifest entry."""
    from tqdm import tqdm

    from fusedserve.engine.adaptivocab.bpe_vocab import read_bpe_vocab
    from fusedserve.engine.adaptivocab.embeddings import patch_state_dict
    from fusedserve.engine.adaptivocab.model_folder import load_state_dict, write_model_folder
    from fusedserve.engine.adaptivocab.patch_tokenizer import PatchTokenizer
    from fusedserve.engine.adaptivocab.vocab_builder import BuildConfig, build_vocab_patch
    from fusedserve.engine.manifest import read_manifest, update_manifest
    from fusedserve.engine.tokenizer import HFTokenizer

    model_dir = Path(request.model_dir)
    source_manifest = read_manifest(model_dir)
    if MANIFEST_KEY in source_manifest:
        raise ValueError(f"{model_dir} is already adapted; build from the original model folder")
    if Path(request.out).resolve() == model_dir.resolve():
        raise ValueError("--out must differ from --model")
    started = time.perf_counter()
    tokenizer = HFTokenizer(model_dir)
    bpe = read_bpe_vocab(model_dir / "tokenizer.json")
    corpus_dir = resolve_corpus(request.corpus)
    split = load_split(corpus_dir, request.heldout_fraction)
    if not split.train:
        raise ValueError(f"the corpus {corpus_dir} has no training documents")
    fast = tokenizer.hf.backend_tokenizer
    train_ids = [
        list(e.ids) for e in fast.encode_batch([d.text for d in split.train], add_special_tokens=False)
    ]
    template = chat_template_tokens(tokenizer, request.max_n)
    config = BuildConfig(replace=request.replace, max_n=request.max_n, min_count=request.min_count)
    with tqdm(total=request.replace, desc="choosing n-grams", disable=not show_progress) as bar:
        patch, selections = build_vocab_patch(
            train_ids, bpe, template.ids, config, progress=bar.update, excluded_ngrams=template.ngrams
        )

    patched = PatchTokenizer(tokenizer, patch)
    entry: dict[str, Any] = {
        "patch_file": PATCH_FILE,
        "replace_requested": request.replace,
        "replaced": patch.replaced,
        "max_n": request.max_n,
        "min_count": request.min_count,
        "base_model": str(model_dir),
        "corpus": str(corpus_dir),
        "heldout_fraction": request.heldout_fraction,
        "train_documents": len(split.train),
        "protected_template_ids": len(template.ids),
        "excluded_template_ngrams": len(template.ngrams),
        "top_new_tokens": [patched.decode([s.token_id], skip_special_tokens=False) for s in selections[:20]],
        **patch.stats,
        **(measure_reduction(split.heldout, patched) if split.heldout else {}),
        "finetuned": False,
    }

    state = patch_state_dict(load_state_dict(model_dir), patch.new_tokens)
    dtype = next(iter(state.values())).dtype
    entry["build_seconds"] = round(time.perf_counter() - started, 1)

    def write_extra(folder: Path) -> None:
        VocabPatch.save(patch, folder)
        update_manifest(folder, MANIFEST_KEY, entry, base=source_manifest)

    updates = {"tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    write_model_folder(model_dir, Path(request.out), state, updates, write_extra)
    return entry
