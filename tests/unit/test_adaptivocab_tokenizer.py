"""PatchTokenizer: round trips, special tokens keep their ids, fewer tokens on domain text, window decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from adaptivocab_helpers import domain_text, write_domain_corpus, write_tiny_model

from fusedserve.engine.adaptivocab.build import BuildRequest, run_build
from fusedserve.engine.adaptivocab.patch_tokenizer import PatchTokenizer, split_at_line_ends
from fusedserve.engine.manifest import read_manifest
from fusedserve.engine.tokenizer import HFTokenizer, load_tokenizer

torch.set_num_threads(1)

VARIED_TEXTS = [
    "See :func:`open` for details of the mode argument. Return the value of the attribute.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🎉🐍 and ümlauts",
    "  leading spaces\ttabs\r\nwindows line\n\n\nblank lines   trailing   ",
    "def f(x):\n    return x ** 2  # squares\n",
    "",
    "a",
    "\x00\x01 control bytes \u200b zero width",
]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("adaptivocab")
    model = write_tiny_model(root / "model")
    corpus = write_domain_corpus(root / "corpus")
    out = root / "adapted"
    entry = run_build(BuildRequest(model, str(corpus), out, replace=80, max_n=3), show_progress=False)
    return {"model": model, "out": out, "entry": entry, "corpus": corpus}


def test_load_tokenizer_returns_patch_tokenizer_for_an_adapted_folder(adapted: dict) -> None:
    assert "adaptivocab" in read_manifest(adapted["out"])
    assert isinstance(load_tokenizer(adapted["out"]), PatchTokenizer)
    assert isinstance(load_tokenizer(adapted["model"]), HFTokenizer)


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_decode_of_encode_round_trips(adapted: dict, text: str) -> None:
    tokenizer = load_tokenizer(adapted["out"])
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_long_text_is_encoded_like_the_original_tokenizer_before_merging(adapted: dict) -> None:
    tokenizer = load_tokenizer(adapted["out"])
    text = "\n".join(domain_text(seed) for seed in range(40)) + "\n\n  tail  \n"
    assert len(text) > 16384 and "".join(split_at_line_ends(text)) == text
    pieces = split_at_line_ends(text, target_chars=100)
    assert "".join(pieces) == text and len(pieces) > 100
    assert [i for p in pieces for i in tokenizer.base.encode(p)] == tokenizer.base.encode(text)
    original = tokenizer.base.encode(text)
    assert tokenizer.encode_original(text) == original
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_and_template_tokens_keep_their_original_ids(adapted: dict) -> None:
    tokenizer = load_tokenizer(adapted["out"])
    base = tokenizer.base
    messages = [{"role": "user", "content": "Return the value of the attribute."}]
    rendered = tokenizer.render_chat(messages)
    ids = tokenizer.encode(rendered)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> ids as in the original vocabulary
    assert tokenizer.encode_chat(messages) == ids
    assert tokenizer.eos_token_ids == base.eos_token_ids == {2}
    assert tokenizer.all_special_ids == base.all_special_ids
    assert tokenizer.vocab_size == base.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert "<|im_start|>" not in tokenizer.decode(ids, skip_special_tokens=True)
    empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
    template_only = tokenizer.render_chat(empty)
    assert tokenizer.encode(template_only) == base.encode(template_only), (
        "the template's tokens are unchanged"
    )


def test_domain_text_needs_fewer_tokens(adapted: dict) -> None:
    tokenizer = load_tokenizer(adapted["out"])
    text = domain_text(999)
    assert len(tokenizer.encode(text)) < 0.8 * len(tokenizer.base.encode(text))
    assert adapted["entry"]["token_reduction"] > 0.2


def test_any_window_of_ids_decodes_to_its_piece_of_text(adapted: dict) -> None:
    tokenizer = load_tokenizer(adapted["out"])
    text = domain_text(7, paragraphs=3)
    ids = tokenizer.encode(text)
    assert "".join(tokenizer.decode([i]) for i in ids) == text
    for start in range(0, len(ids) - 5, 7):
        window = tokenizer.decode(ids[start : start + 5])
        assert window and window in text
    new_id = next(iter(tokenizer.patch.new_tokens))
    assert tokenizer.token_text(new_id) == tokenizer.base.decode(list(tokenizer.patch.new_tokens[new_id]))


def test_adapted_folder_keeps_original_tokenizer_and_unties_embeddings(adapted: dict) -> None:
    import json

    from safetensors.torch import load_file

    out, model = adapted["out"], adapted["model"]
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    state = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" in state
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    entry = read_manifest(out)["adaptivocab"]
    assert entry["replaced"] == 80 and entry["max_n"] == 3 and entry["corpus"] == str(adapted["corpus"])


def test_build_refuses_an_already_adapted_folder(adapted: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="already adapted"):
        run_build(BuildRequest(adapted["out"], str(adapted["corpus"]), tmp_path / "x", replace=5))
