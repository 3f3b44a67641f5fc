"""The engine on CUDA against the CPU engine on the real default model (SmolLM2-135M-Instruct).

NOT YET RUN ON A GPU (written 2026-11-21 without one). fp32 on CUDA (SDPA attention, cuBLAS without TF32)
must give the CPU engine's greedy tokens exactly; bf16 on CUDA (flashinfer when installed) must agree on the
prompt's next-token distribution within bf16 rounding, and on the first greedy token.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.kernels.attention import SlotBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT_TEXTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Three colours of the rainbow are red,",
    "In 1969, the first person to walk on the moon was",
]


def make_engine(model_dir: Path, device: str, dtype: str, kv_backend: str = "vattention", **cache) -> LLMEngine:
    config = EngineConfig(
        ModelConfig(model_dir, "smollm2", dtype=dtype, device=device),
        CacheConfig(kv_backend=kv_backend, **cache),
        SchedulerConfig(max_num_seqs=8, max_model_len=512, max_num_batched_tokens=64),
        threads=1,
    )
    return LLMEngine.from_config(config)


def greedy(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_work:
        for output in engine.step():
            assert output.error is None, output.error
            tokens[output.request_id].extend(output.new_token_ids)
    engine.kv_cache.close()
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def prompts(real_model_dir: Path) -> list[list[int]]:
    from fusedserve.engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    return [tokenizer.encode(text) for text in PROMPT_TEXTS]


@pytest.fixture(scope="module")
def cpu_tokens(real_model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return greedy(make_engine(real_model_dir, "cpu", "float32", kv_backend="static"), prompts)


@pytest.mark.parametrize("kv_backend", ["static", "vattention"])
def test_fp32_greedy_tokens_on_cuda_equal_the_cpu_engine(real_model_dir, prompts, cpu_tokens, kv_backend):
    engine = make_engine(real_model_dir, "cuda", "float32", kv_backend=kv_backend)
    assert engine.model.device.type == "cuda" and engine.kv_cache.key_cache[0].device.type == "cuda"
    assert greedy(engine, prompts) == cpu_tokens


def test_fp32_greedy_tokens_survive_preemption_on_a_small_cuda_kv_budget(real_model_dir, prompts, cpu_tokens):
    # fp32, all layers' K and V: 46,080 bytes per token, so a 2 MiB page holds 45 tokens and 3 pages 136.
    engine = make_engine(real_model_dir, "cuda", "float32", kv_cache_memory=3 * 2 * 1024 * 1024)
    long_prompts = [p * 3 for p in prompts]  # ~30-40 tokens each, + 24 generated: not all fit in 3 pages at once
    reference = greedy(make_engine(real_model_dir, "cpu", "float32", kv_backend="static"), long_prompts)
    assert greedy(engine, long_prompts) == reference


def test_auto_dtype_on_cuda_is_bf16(real_model_dir):
    engine = make_engine(real_model_dir, "cuda", "auto")
    assert engine.model.dtype == torch.bfloat16 and engine.config.model.dtype == "bfloat16"
    engine.kv_cache.close()


def test_bf16_cuda_engine_agrees_with_the_cpu_engine_on_next_token_distributions(real_model_dir, prompts, cpu_tokens):
    cuda_engine = make_engine(real_model_dir, "cuda", "bfloat16")
    cpu_engine = make_engine(real_model_dir, "cpu", "float32", kv_backend="static")
    for prompt, reference in zip(prompts, cpu_tokens, strict=True):
        logprobs = []
        for engine in (cpu_engine, cuda_engine):
            model, cache = engine.model, engine.kv_cache
            slot = cache.allocate_slot()
            assert cache.reserve_tokens(slot, len(prompt))
            batch = SlotBatch.build([slot], [len(prompt)], [len(prompt)], model.device)
            ids = torch.tensor(prompt, device=model.device)
            hidden = model.forward(ids, batch, cache.key_cache, cache.value_cache)
            logits = model.compute_logits(hidden[-1:]).cpu()
            logprobs.append(torch.log_softmax(logits, dim=-1)[0])
            cache.free_slot(slot)
        cpu_lp, cuda_lp = logprobs
        assert int(cuda_lp.argmax()) == reference[0]
        top = cpu_lp.topk(20).indices
        assert (cpu_lp[top] - cuda_lp[top]).abs().max() < 0.25  # bf16 through 30 layers
    assert all(len(t) == 24 for t in greedy(cuda_engine, prompts))
