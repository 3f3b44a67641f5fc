"""The serving benchmark's engine-only replay: a closed loop that counts every token and every request once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fusedserve.engine.model.random_model import write_random_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from engine_replay import replay  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny"), tokenizer_from=ensure_default_model())


def test_replay_runs_every_request_to_its_full_length_with_bounded_concurrency(tiny_model_dir: Path) -> None:
    prompts = [f"prompt number {i} about the sea" for i in range(7)]
    result = replay(tiny_model_dir, prompts, concurrency=3, max_tokens=5, threads=1)
    assert result.label == "engine-only" and result.num_requests == 7 and result.errors == 0
    assert result.mean_output_tokens == 5  # ignore_eos + min_tokens: every request produces exactly max_tokens
    assert result.output_tokens_per_s == pytest.approx(35 / result.seconds)
    assert 0 < result.ttft_p50 <= result.ttft_p99 <= result.seconds
    assert 0 < result.itl_p50 <= result.itl_p99
