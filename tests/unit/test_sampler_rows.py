"""The C++ row kernel and the pure-torch path choose the same token for the same logits, settings and uniform."""

from __future__ import annotations

import random

import pytest
import torch

from fusedserve.engine.request import Request
from fusedserve.engine.sampler import Sampler
from fusedserve.engine.sampler_rows import (
    NUM_CANDIDATES,
    RowParams,
    choose_tokens,
    choose_tokens_torch,
    load_sampler_kernel,
)
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.kernels.cpu.extensions import DISABLE_ENV

torch.set_num_threads(1)
kernel = load_sampler_kernel()
needs_kernel = pytest.mark.skipif(kernel is None, reason="the C++ sampler kernel cannot be built here")


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.05, 0.3, 0.8, 1.0, 1.7]),
        top_k=rng.choice([0, 0, -1, 1, 5, NUM_CANDIDATES, NUM_CANDIDATES + 1, 300, vocab - 1, vocab]),
        top_p=rng.choice([1.0, 1.0, 0.0, 0.5, 0.9, 0.95, 0.999]),
        min_p=rng.choice([0.0, 0.0, 0.01, 0.2, 1.0]),
    )


def random_logits(gen: torch.Generator, rows: int, vocab: int, case: int) -> torch.Tensor:
    """Gaussian rows at one of several spreads; every third batch rounded into ties, every fourth partly -inf."""
    x = torch.randn(rows, vocab, generator=gen) * [0.1, 1.0, 3.0, 8.0][case % 4]
    if case % 3 == 0:
        x = (x * 2).round() / 2
    if case % 4 == 1:
        x[:, : vocab // 3] = float("-inf")
    return x


def assert_same_tokens(x: torch.Tensor, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Identical tokens, except that float rounding (a sum in another order, an exp one ulp off on another CPU)
    may move a draw across the boundary between two tokens of equal logit, in rows holding thousands of ties."""
    differ = (ours != reference).nonzero().flatten()
    assert torch.equal(x[differ, ours[differ]], x[differ, reference[differ]]), f"rows {differ.tolist()}"
    assert len(differ) <= len(x) // 100


@needs_kernel
@pytest.mark.parametrize("vocab", [64, 200, 1000, 4099, 49152])
def test_kernel_chooses_the_torch_paths_tokens_for_random_rows_and_settings(vocab: int):
    rng, gen = random.Random(vocab), torch.Generator().manual_seed(vocab)
    xs, ours, reference = [], [], []
    for case in range(24 if vocab < 10_000 else 4):
        x = random_logits(gen, 32, vocab, case)
        rows = RowParams.build(
            [random_params(rng, vocab) for _ in range(32)], torch.rand(32, generator=gen, dtype=torch.float64), vocab
        )
        xs.append(x)
        ours.append(choose_tokens(x, rows, kernel))
        reference.append(choose_tokens_torch(x, rows))
    assert_same_tokens(torch.cat(xs), torch.cat(ours), torch.cat(reference))


@needs_kernel
@pytest.mark.parametrize("u", [0.0, 0.5, 1.0 - 2.0**-53])
def test_kernel_and_torch_path_agree_at_the_ends_of_the_uniform_range_and_skip_masked_ids(u: float):
    vocab = 1000
    x = torch.randn(16, vocab, generator=torch.Generator().manual_seed(5))
    x[:, ::2] = float("-inf")  # even ids are masked
    params = [
        SamplingParams(temperature=1.0, top_p=[1.0, 0.9][i % 2], top_k=[0, 0, 7, 300][i % 4], min_p=[0.0, 0.1][i // 8])
        for i in range(16)
    ]
    rows = RowParams.build(params, torch.full((16,), u, dtype=torch.float64), vocab)
    tokens = choose_tokens(x, rows, kernel)
    assert_same_tokens(x, tokens, choose_tokens_torch(x, rows))
    assert (tokens % 2 == 1).all()


@pytest.mark.parametrize("use_kernel", [True, False])
def test_a_row_without_a_finite_logit_is_marked_minus_one(use_kernel: bool):
    if use_kernel and kernel is None:
        pytest.skip("the C++ sampler kernel cannot be built here")
    x = torch.randn(3, 300)
    x[1] = float("-inf")
    params = [SamplingParams(temperature=t) for t in (0.0, 0.0, 1.0)]
    rows = RowParams.build(params, torch.full((3,), 0.5, dtype=torch.float64), 300)
    tokens = choose_tokens(x, rows, kernel) if use_kernel else choose_tokens_torch(x, rows)
    assert tokens[1] == -1 and tokens[0] == x[0].argmax() and tokens[2] >= 0


@needs_kernel
def test_kernel_tokens_do_not_depend_on_the_thread_count():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    x = random_logits(gen, 40, 4099, 1)
    rows = RowParams.build(
        [random_params(rng, 4099) for _ in range(40)], torch.rand(40, generator=gen, dtype=torch.float64), 4099
    )
    single = choose_tokens(x, rows, kernel)
    torch.set_num_threads(2)
    try:
        assert all(torch.equal(choose_tokens(x, rows, kernel), single) for _ in range(5))
    finally:
        torch.set_num_threads(1)


@needs_kernel
def test_sampler_on_the_kernel_reproduces_the_pure_torch_sampler(monkeypatch: pytest.MonkeyPatch):
    """Same sampler seed, same requests (seeded and not, with penalties and masks): the same tokens every step."""
    vocab = 3000
    gen = torch.Generator().manual_seed(9)

    def requests() -> list[Request]:
        params = [
            SamplingParams(temperature=0.8, top_p=0.95),
            SamplingParams(temperature=0.0),
            SamplingParams(seed=11, top_k=40, temperature=0.7),
            SamplingParams(min_p=0.05, frequency_penalty=0.5),
            SamplingParams(top_p=0.9, repetition_penalty=1.3, logit_bias={5: 3.0}),
            SamplingParams(min_tokens=4, top_k=500, top_p=0.8),
        ]
        return [Request(f"r{i}", [1, 2, 3], p, 10_000, output_token_ids=[4, 5, 5]) for i, p in enumerate(params)]

    on_kernel = (Sampler(vocab, [0], seed=3), requests())
    monkeypatch.setenv(DISABLE_ENV, "1")
    on_torch = (Sampler(vocab, [0], seed=3), requests())
    assert on_kernel[0].uses_kernel and not on_torch[0].uses_kernel
    for step in range(20):
        x = torch.randn(6, vocab, generator=gen) * 2
        tokens = [[r.token_id for r in sampler.sample(x, batch)] for sampler, batch in (on_kernel, on_torch)]
        assert tokens[0] == tokens[1], f"step {step}"
        for _, batch in (on_kernel, on_torch):
            for request, token in zip(batch, tokens[0], strict=True):
                request.output_token_ids.append(token)
