"""The real default model (SmolLM2-135M-Instruct) adapted with a small --replace on a Python docs sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fusedserve.engine.adaptivocab.build import BuildRequest, run_build
from fusedserve.engine.adaptivocab.patch_tokenizer import PatchTokenizer
from fusedserve.engine.tokenizer import load_tokenizer

torch.set_num_threads(1)
SAMPLE_FILES = [
    "library/functions.rst.txt",
    "library/stdtypes.rst.txt",
    "tutorial/controlflow.rst.txt",
    "library/os.path.rst.txt",
    "reference/datamodel.rst.txt",
    "library/json.rst.txt",
]


@pytest.fixture(scope="module")
def docs_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusedserve.engine.adaptivocab.corpus import ensure_python_docs

    try:
        sources = ensure_python_docs()
    except (OSError, RuntimeError) as error:
        pytest.skip(f"python3.11-doc is not available here: {error}")
    root = tmp_path_factory.mktemp("pydocs")
    for name in SAMPLE_FILES:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources / name, target)
    return root


@pytest.mark.slow
def test_default_model_builds_with_a_small_replace(docs_sample: Path, tmp_path: Path) -> None:
    from fusedserve.engine.model.default_model import ensure_default_model

    model = ensure_default_model()
    out = tmp_path / "adapted"
    entry = run_build(
        BuildRequest(model, str(docs_sample), out, replace=300, max_n=3, heldout_fraction=0.34),
        show_progress=False,
    )
    assert entry["replaced"] == 300 and entry["heldout_documents"] >= 1
    assert entry["token_reduction"] > 0.05
    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, PatchTokenizer) and tokenizer.vocab_size == 49152
    text = (docs_sample / "library/json.rst.txt").read_text()[:4000]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    rendered = tokenizer.render_chat([{"role": "user", "content": "What does :func:`len` return?"}])
    ids = tokenizer.encode(rendered)
    generation_prompt = tokenizer.base.encode("<|im_start|>assistant\n")
    assert ids[0] == 1 and ids[-len(generation_prompt) :] == generation_prompt
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
