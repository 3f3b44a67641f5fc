"""Our Llama code agrees with Hugging Face transformers on the real SmolLM2: same greedy tokens, close logits."""

from __future__ import annotations

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.model.default_model import ensure_default_model
from fusedserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Explain photosynthesis in one sentence. Ünïcödé ✓"}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir():
    torch.set_num_threads(2)
    return ensure_default_model()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def make_engine(model_dir, dtype: str) -> LLMEngine:
    config = EngineConfig(
        ModelConfig(model_dir, "smollm2", dtype=dtype),
        CacheConfig(kv_backend="vattention"),
        SchedulerConfig(max_num_seqs=8, max_model_len=1024, max_num_batched_tokens=512),
        threads=2,
    )
    return LLMEngine.from_config(config)


def engine_greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_work:
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
    return [outputs[str(i)] for i in range(len(prompts))]


def test_greedy_tokens_equal_transformers_in_float32(model_dir, hf_model):
    engine = make_engine(model_dir, "float32")
    prompts = [engine.tokenizer.encode_chat(m) for m in MESSAGES]
    ours = engine_greedy(engine, prompts)  # all four batched together
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            reference = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False
            )[0, len(prompt) :].tolist()
        assert tokens == reference


def test_last_token_logits_match_transformers(model_dir, hf_model):
    from fusedserve.kernels.attention import SlotBatch

    engine = make_engine(model_dir, "float32")
    prompt = engine.tokenizer.encode_chat(MESSAGES[1])
    batch = SlotBatch.build([0], [len(prompt)], [len(prompt)])
    slot = engine.kv_cache.allocate_slot()
    assert slot == 0 and engine.kv_cache.reserve_tokens(0, len(prompt))
    hidden = engine.model.forward(
        torch.tensor(prompt), batch, engine.kv_cache.key_cache, engine.kv_cache.value_cache
    )
    ours = engine.model.compute_logits(hidden)
    with torch.no_grad():
        reference = hf_model(torch.tensor([prompt])).logits[0]
    assert torch.allclose(ours, reference, atol=2e-3, rtol=1e-4), (ours - reference).abs().max()
    engine.kv_cache.free_slot(0)


def test_mixed_precision_default_keeps_greedy_choices(model_dir):
    """--dtype auto computes large batches in bf16; its greedy choices must match float32 at the start."""
    exact = engine_greedy(make_engine(model_dir, "float32"), [make_engine_prompt(model_dir)])
    mixed = engine_greedy(make_engine(model_dir, "auto"), [make_engine_prompt(model_dir)])
    assert mixed[0][:8] == exact[0][:8]


def make_engine_prompt(model_dir) -> list[int]:
    from fusedserve.engine.tokenizer import HFTokenizer

    return HFTokenizer(model_dir).encode_chat(MESSAGES[0])
