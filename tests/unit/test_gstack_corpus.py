"""Byte-level corpus and tokenizer: ids are bytes, the split is deterministic, batches are pure functions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fusedserve.engine.gstack.byte_tokenizer import EOT_ID, build_byte_tokenizer
from fusedserve.engine.gstack.corpus import TokenStream, is_heldout, load_corpus

torch.set_num_threads(1)


def test_tokenizer_ids_are_utf8_bytes_and_decode_round_trips() -> None:
    tokenizer = build_byte_tokenizer()
    text = "def f(x):\n\treturn 'héllo €'  # ok"
    ids = tokenizer.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == EOT_ID and len(tokenizer) == 257


def test_chat_template_joins_message_contents_as_a_code_prompt() -> None:
    messages = [{"role": "system", "content": "# helpers"}, {"role": "user", "content": "def add(a, b):"}]
    tokenizer = build_byte_tokenizer()
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "# helpers\ndef add(a, b):"


def test_split_by_file_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    for i in range(60):
        (tmp_path / f"mod_{i}.py").write_text(f"x = {i}\n")
    first, second = load_corpus(tmp_path, per_mille=300), load_corpus(tmp_path, per_mille=300)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.heldout, second.heldout)
    assert first.train_files + first.heldout_files == 60
    heldout_names = {f"mod_{i}.py" for i in range(60) if is_heldout(f"mod_{i}.py", 300)}
    assert first.heldout_files == len(heldout_names)
    assert int((first.train == EOT_ID).sum()) == first.train_files


def test_batches_are_a_pure_function_of_step_and_offset_skips_seen_windows() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    stream, again = TokenStream(tokens, 16, seed=3), TokenStream(tokens, 16, seed=3)
    assert torch.equal(stream.batch(5, 4), again.batch(5, 4))
    assert torch.equal(stream.batch(1, 4, offset_windows=0), stream.batch(0, 4, offset_windows=4))
    first_epoch = torch.cat([stream.batch(s, 4) for s in range(stream.num_windows // 4)])
    assert len({tuple(row.tolist()) for row in first_epoch}) == len(first_epoch)
