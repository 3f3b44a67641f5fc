"""Pre-training loop: loss goes down, resume continues the same run, schedule shape, manifest token counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fusedserve.engine.gstack.corpus import TokenStream, heldout_windows
from fusedserve.engine.gstack.grow import grow_folder
from fusedserve.engine.gstack.manifest import read_manifest
from fusedserve.engine.gstack.model_folder import ModelShape, create_random_model, load_model
from fusedserve.engine.gstack.train import LOG_NAME, STATE_NAME, TrainConfig, learning_rate, train

torch.set_num_threads(1)

TOKENS = np.frombuffer(b"for i in range(10):\n    print(i * i)\n" * 300, dtype=np.uint8).astype(np.uint16)
SEQ = 32


@pytest.fixture()
def init_folder(tmp_path: Path) -> Path:
    return create_random_model(tmp_path / "init", ModelShape(1, 32, 4, 64, 64), seed=0)


def run(init: Path, out: Path, steps: int, max_seconds: float | None = None):
    config = TrainConfig(
        total_steps=steps,
        batch_size=4,
        seq_len=SEQ,
        warmup_steps=2,
        eval_every=2,
        log_every=1,
        checkpoint_every=3,
    )
    stream = TokenStream(TOKENS, SEQ)
    return train(init, out, config, stream, heldout_windows(TOKENS, SEQ, 4), max_seconds, progress=False)


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]


def test_a_few_steps_lower_the_heldout_loss(init_folder: Path, tmp_path: Path) -> None:
    outcome = run(init_folder, tmp_path / "out", steps=20)
    log = read_log(tmp_path / "out")
    assert outcome.finished and outcome.step == 20
    assert log[-1]["heldout_loss"] < log[0]["heldout_loss"] - 0.5


def test_log_records_tokens_and_six_n_d_flops(init_folder: Path, tmp_path: Path) -> None:
    outcome = run(init_folder, tmp_path / "out", steps=3)
    last = read_log(tmp_path / "out")[-1]
    assert last["tokens"] == 3 * 4 * SEQ
    assert last["flops"] == 6.0 * outcome.params * last["tokens"]


def test_resume_continues_from_the_checkpoint_to_the_same_weights(init_folder: Path, tmp_path: Path) -> None:
    paused = run(init_folder, tmp_path / "parts", steps=6, max_seconds=0.0)
    assert not paused.finished and paused.step == 1
    assert torch.load(tmp_path / "parts" / STATE_NAME, weights_only=True)["step"] == 1
    resumed = run(init_folder, tmp_path / "parts", steps=6)
    straight = run(init_folder, tmp_path / "straight", steps=6)
    assert resumed.finished and resumed.step == straight.step == 6
    assert [e["step"] for e in read_log(tmp_path / "parts")] == list(range(7))
    parts, whole = load_model(tmp_path / "parts"), load_model(tmp_path / "straight")
    for (name, a), (_, b) in zip(parts.state_dict().items(), whole.state_dict().items(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_with_a_different_config_is_refused(init_folder: Path, tmp_path: Path) -> None:
    run(init_folder, tmp_path / "out", steps=2)
    with pytest.raises(ValueError):
        run(init_folder, tmp_path / "out", steps=3)


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    config = TrainConfig(total_steps=100, warmup_steps=10, max_lr=1e-3)
    assert learning_rate(0, config) == pytest.approx(1e-4)
    assert learning_rate(9, config) == pytest.approx(1e-3)
    assert learning_rate(55, config) == pytest.approx(0.55e-3)
    assert learning_rate(100, config) == pytest.approx(1e-4)


def test_manifest_counts_pretraining_and_post_growth_tokens(init_folder: Path, tmp_path: Path) -> None:
    run(init_folder, tmp_path / "base", steps=2)
    assert read_manifest(tmp_path / "base") == {"pretrain": {"trained_tokens": 2 * 4 * SEQ}}
    grow_folder(tmp_path / "base", 2, tmp_path / "grown")
    run(tmp_path / "grown", tmp_path / "grown_trained", steps=3)
    provenance = read_manifest(tmp_path / "grown_trained")["gstack"]
    assert provenance["base_tokens"] == 2 * 4 * SEQ
    assert provenance["trained_tokens"] == 3 * 4 * SEQ
    assert provenance["factor"] == 2 and provenance["base_layers"] == 1
