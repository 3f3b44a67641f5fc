"""Sampler: each SamplingParams field does what OpenAI/vLLM say, on small vocabularies, with real assertions.
Every test runs twice: on the C++ row kernel and on the pure-torch path (FUSEDSERVE_NO_CPP_KERNELS=1)."""

from __future__ import annotations

import math

import pytest
import torch

from fusedserve.engine.request import Request
from fusedserve.engine.sampler import Sampler
from fusedserve.engine.sampler_blocks import BLOCK, block_topk, draw_truncated_row, to_blocks
from fusedserve.engine.sampler_rows import NUM_CANDIDATES, load_sampler_kernel
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.kernels.cpu.extensions import DISABLE_ENV

torch.set_num_threads(1)
EOS = 3


def request(prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> Request:
    return Request("r", list(prompt or [0]), SamplingParams(**params), 10_000, output_token_ids=list(output or []))


def draw(logits: torch.Tensor, n: int, seed: int = 0, **params: object) -> torch.Tensor:
    """n tokens for n copies of one row of logits, in one sample() call."""
    sampler = Sampler(logits.shape[-1], [EOS], seed=seed)
    results = sampler.sample(logits.reshape(1, -1).expand(n, -1), [request(**params) for _ in range(n)])
    return torch.tensor([r.token_id for r in results])


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def softmax_reference(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """vLLM's order: temperature, min_p, top_k, top_p (sort-based), renormalised."""
    x = logits.double() / temperature
    probs = torch.softmax(x, -1)
    x = x.masked_fill(probs < min_p * probs.max(), -math.inf)
    if top_k:
        x = x.masked_fill(x < x.topk(top_k).values[-1], -math.inf)
    ordered, order = torch.softmax(x, -1).sort(descending=True)
    x[order[(ordered.cumsum(0) - ordered) >= top_p]] = -math.inf
    return torch.softmax(x, -1)


@pytest.fixture(autouse=True, params=["cpp", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which implementation the Samplers built in the test use."""
    if request.param == "torch":
        monkeypatch.setenv(DISABLE_ENV, "1")
    elif load_sampler_kernel() is None:
        pytest.skip("the C++ sampler kernel cannot be built here")
    return str(request.param)


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(200, generator=torch.Generator().manual_seed(1)) * 2  # 200: not a multiple of BLOCK


# -- greedy ---------------------------------------------------------------------------------------------------
def test_greedy_picks_the_first_maximum_of_every_row():
    x = torch.randn(7, 1000, generator=torch.Generator().manual_seed(0))
    x[3, 10] = x[3, 900] = 50.0  # a tie: argmax semantics pick the first
    results = Sampler(1000).sample(x, [request(temperature=0.0) for _ in range(7)])
    assert [r.token_id for r in results] == x.argmax(-1).tolist()
    assert results[3].token_id == 10


def test_greedy_rows_in_a_mixed_batch_still_take_the_argmax(logits: torch.Tensor):
    x = logits.expand(6, -1)
    requests = [request(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    results = Sampler(200, seed=0).sample(x, requests)
    assert [results[i].token_id for i in (1, 3, 5)] == [int(logits.argmax())] * 3


def test_sample_leaves_the_callers_logits_unchanged(logits: torch.Tensor):
    x = logits.expand(2, -1).contiguous()
    before = x.clone()
    requests = [
        request(output=[5, 5, 7], frequency_penalty=1.0, repetition_penalty=1.5, logit_bias={9: 50.0}, min_tokens=10),
        request(temperature=0.0, logit_bias={4: -100.0}),
    ]
    Sampler(200, [EOS], seed=0).sample(x, requests)
    assert torch.equal(x, before)


# -- temperature, top-k, top-p, min-p -------------------------------------------------------------------------
def test_temperature_one_samples_the_softmax_distribution(logits: torch.Tensor):
    empirical = frequencies(draw(logits, 5000), 200)
    assert (empirical - softmax_reference(logits)).abs().max() < 0.02  # 5 binomial sigmas at most


def test_lower_temperature_concentrates_on_the_best_token(logits: torch.Tensor):
    best = int(logits.argmax())
    cold = (draw(logits, 2500, temperature=0.3) == best).double().mean()
    hot = (draw(logits, 1000, temperature=3.0) == best).double().mean()
    expected_cold = float(softmax_reference(logits, temperature=0.3)[best])
    assert cold == pytest.approx(expected_cold, abs=0.03)
    assert hot < cold - 0.2


def test_top_k_restricts_the_support_to_the_k_best(logits: torch.Tensor):
    tokens = draw(logits, 1000, temperature=2.0, top_k=5)
    assert set(tokens.tolist()) == set(logits.topk(5).indices.tolist())


def test_top_k_beyond_the_candidate_set_is_exact():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(2)) * 0.1  # flat: 150 survivors reach far
    tokens = draw(x, 1500, top_k=NUM_CANDIDATES + 86)
    assert set(tokens.tolist()) <= set(x.topk(NUM_CANDIDATES + 86).indices.tolist())
    assert len(set(tokens.tolist())) > 120


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    assert set(draw(x, 600, top_p=0.8).tolist()) == {0, 1}
    assert set(draw(x, 600, top_p=0.81).tolist()) == {0, 1, 2}
    assert set(draw(x, 200, top_p=0.01).tolist()) == {0}


def test_top_p_with_a_nucleus_wider_than_the_candidates_matches_the_sorted_reference():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    reference = softmax_reference(x, top_p=0.7)
    assert (reference > 0).sum() > 10 * NUM_CANDIDATES
    tokens = draw(x, 600, top_p=0.7)
    assert set(tokens.tolist()) <= set(reference.nonzero().flatten().tolist())
    assert len(set(tokens.tolist())) > 300


def test_min_p_drops_tokens_below_that_fraction_of_the_best(logits: torch.Tensor):
    probs = torch.softmax(logits, -1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    assert set(draw(logits, 3000, min_p=0.2).tolist()) == allowed


def test_combined_truncation_follows_vllm_order(logits: torch.Tensor):
    params = {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "min_p": 0.02}
    reference = softmax_reference(logits, **params)
    empirical = frequencies(draw(logits, 5000, **params), 200)
    assert set(empirical.nonzero().flatten().tolist()) <= set(reference.nonzero().flatten().tolist())
    assert (empirical - reference).abs().max() < 0.025


# -- seeds ----------------------------------------------------------------------------------------------------
def test_a_seed_reproduces_the_same_tokens_whatever_the_batch(logits: torch.Tensor):
    def run(batch_extra: int, sampler_seed: int) -> list[int]:
        sampler = Sampler(200, seed=sampler_seed)
        seeded = request(seed=1234, top_p=0.95)
        tokens = []
        for _ in range(20):
            others = [request(temperature=0.7) for _ in range(batch_extra)]
            x = logits.expand(1 + batch_extra, -1)
            tokens.append(sampler.sample(x, others + [seeded])[-1].token_id)
        return tokens

    assert run(0, 1) == run(5, 2)


def test_different_seeds_give_different_tokens(logits: torch.Tensor):
    def tokens(seed: int) -> list[int]:
        sampler, r = Sampler(200), request(seed=seed, temperature=1.5)
        return [sampler.sample(logits[None], [r])[0].token_id for _ in range(30)]

    assert tokens(1) != tokens(2)
    assert tokens(1) == tokens(1)


def test_the_sampler_seed_makes_unseeded_requests_reproducible(logits: torch.Tensor):
    assert torch.equal(draw(logits, 50, seed=7), draw(logits, 50, seed=7))
    assert not torch.equal(draw(logits, 50, seed=7), draw(logits, 50, seed=8))


# -- logits edits ---------------------------------------------------------------------------------------------
def test_presence_penalty_lowers_each_output_token_once():
    x = torch.zeros(1, 10)
    edited = Sampler(10).edited_logits(x, [request(prompt=[1], output=[2, 2, 5], presence_penalty=0.5)])
    assert edited[0].tolist() == [0, 0, -0.5, 0, 0, -0.5, 0, 0, 0, 0]


def test_frequency_penalty_scales_with_the_output_count():
    x = torch.ones(1, 10)
    edited = Sampler(10).edited_logits(x, [request(prompt=[1], output=[2, 2, 2, 5], frequency_penalty=0.25)])
    assert edited[0].tolist() == pytest.approx([1, 1, 0.25, 1, 1, 0.75, 1, 1, 1, 1])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    x = torch.tensor([[2.0, -2.0, 2.0, -2.0, 2.0]])
    edited = Sampler(5).edited_logits(x, [request(prompt=[0], output=[1], repetition_penalty=2.0)])
    assert edited[0].tolist() == [1.0, -4.0, 2.0, -2.0, 2.0]  # ids 0 (prompt) and 1 (output) only


def test_penalties_follow_the_output_as_it_grows():
    sampler, r = Sampler(10), request(output=[4], presence_penalty=1.0)
    x = torch.zeros(1, 10)
    assert sampler.edited_logits(x, [r])[0, 6] == 0.0
    r.output_token_ids += [6, 6]
    assert sampler.edited_logits(x, [r])[0].tolist() == [0, 0, 0, 0, -1, 0, -1, 0, 0, 0]


def test_logit_bias_forces_and_forbids_tokens(logits: torch.Tensor):
    best = int(logits.argmax())
    assert set(draw(logits, 500, temperature=1.0, logit_bias={17: 100.0}).tolist()) == {17}
    greedy = draw(logits, 5, temperature=0.0, logit_bias={best: -100.0})
    assert best not in greedy.tolist()


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    x = torch.zeros(1, 8)
    x[0, EOS] = x[0, 6] = 10.0
    sampler = Sampler(8, [EOS])
    early = sampler.edited_logits(x, [request(output=[1], min_tokens=2, stop_token_ids=[6])])[0]
    assert math.isinf(early[EOS]) and math.isinf(early[6]) and early[0] == 0.0
    done = sampler.edited_logits(x, [request(output=[1, 1], min_tokens=2, stop_token_ids=[6])])[0]
    assert done[EOS] == 10.0 and done[6] == 10.0
    assert sampler.sample(x, [request(output=[1], min_tokens=2, temperature=0.0)])[0].token_id not in (EOS,)


def test_ignore_eos_keeps_eos_unmasked_but_stop_token_ids_masked():
    x = torch.zeros(1, 8)
    edited = Sampler(8, [EOS]).edited_logits(x, [request(min_tokens=5, ignore_eos=True, stop_token_ids=[6])])[0]
    assert edited[EOS] == 0.0 and math.isinf(edited[6])


def test_a_row_with_every_token_masked_falls_back_to_its_raw_logits():
    x = torch.tensor([[1.0, 5.0]])
    result = Sampler(2, [0, 1]).sample(x, [request(min_tokens=3, temperature=0.0)])
    assert result[0].token_id == 1


# -- logprobs -------------------------------------------------------------------------------------------------
def test_logprobs_come_from_log_softmax_of_the_raw_logits(logits: torch.Tensor):
    r = request(output=[1, 1], temperature=0.5, frequency_penalty=2.0, logprobs=5)
    result = Sampler(200, seed=0).sample(logits[None], [r])[0]
    reference = torch.log_softmax(logits.double(), -1)
    assert result.logprobs is not None
    assert result.logprobs.token_id == result.token_id
    assert result.logprobs.logprob == pytest.approx(float(reference[result.token_id]), abs=1e-5)
    ids = [t for t, _ in result.logprobs.top]
    assert ids == reference.topk(5).indices.tolist()
    assert [v for _, v in result.logprobs.top] == pytest.approx(reference.topk(5).values.tolist(), abs=1e-5)


def test_logprobs_top_list_is_sized_per_request_and_sorted(logits: torch.Tensor):
    requests = [request(logprobs=0), request(logprobs=3), request(), request(logprobs=20, temperature=0.0)]
    results = Sampler(200, seed=0).sample(logits.expand(4, -1), requests)
    assert results[0].logprobs is not None and results[0].logprobs.top == []
    assert results[2].logprobs is None
    assert [len(r.logprobs.top) for r in (results[1], results[3]) if r.logprobs] == [3, 20]
    top = results[3].logprobs.top if results[3].logprobs else []
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)


# -- block ops ------------------------------------------------------------------------------------------------
def test_block_topk_equals_torch_topk():
    x = torch.randn(5, 3 * BLOCK + 17, generator=torch.Generator().manual_seed(4))
    xb = to_blocks(x)
    values, ids = block_topk(xb, xb.amax(-1), torch.arange(5), 40)
    expected = x.topk(40)
    assert torch.equal(values, expected.values) and torch.equal(ids, expected.indices)


def test_truncated_row_draw_never_picks_a_token_outside_the_nucleus():
    values = torch.tensor([1.0, 0.5, 0.0, 0.25, 0.125], dtype=torch.float32).numpy()
    picks = {draw_truncated_row(values, float(values.sum()), 0, 0.0, 0.7, u / 100) for u in range(100)}
    assert picks == {0, 1}
    zero_weight = {draw_truncated_row(values, float(values.sum()), 4, 0.0, 1.0, u / 100) for u in range(100)}
    assert 2 not in zero_weight and zero_weight == {0, 1, 3, 4}


def test_mismatched_logits_shape_is_rejected():
    with pytest.raises(ValueError):
        Sampler(10).sample(torch.zeros(2, 11), [request(), request()])


def test_inference_mode_logits_from_the_model_are_accepted(logits: torch.Tensor):
    with torch.inference_mode():
        x = logits.expand(2, -1).clone()
    requests = [request(output=[1, 2], frequency_penalty=1.0, logit_bias={3: 2.0}, min_tokens=5), request()]
    results = Sampler(200, [EOS], seed=0).sample(x, requests)
    assert len(results) == 2 and torch.equal(x, logits.expand(2, -1))
