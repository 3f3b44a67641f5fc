"""vAttention inside the real engine (tiny random Llama): exhaustion preempts, and greedy output stays exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.kv_cache import KVCache, KVCacheSpec
from fusedserve.engine.llm_engine import LLMEngine, build_kv_cache, load_model_for_engine
from fusedserve.engine.model.random_model import write_random_llama
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.tokenizer import load_tokenizer
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache

MAX_MODEL_LEN = 256
PAGE = 4096
# Tiny model: 2 layers x 2 KV heads x 16 dims, float32 -> 512 bytes per token over all layers.
PROMPTS = [list(range(20, 20 + n)) for n in (9, 70, 33, 120, 4, 51, 88)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny-va"), tokenizer_from=ensure_default_model())


def _config(model_dir: Path, backend: str) -> EngineConfig:
    scheduler = SchedulerConfig(max_num_seqs=6, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=48)
    cache = CacheConfig(kv_backend=backend, kv_page_size=PAGE)
    return EngineConfig(ModelConfig(model_dir, "tiny", dtype="float32"), cache, scheduler)


def _engine(model_dir: Path, kv_cache_for=None) -> LLMEngine:
    """The static engine, or one whose KV cache `kv_cache_for(spec)` builds."""
    config = _config(model_dir, "static")
    model = load_model_for_engine(model_dir, "float32", MAX_MODEL_LEN)
    cache: KVCache = build_kv_cache(config, model)
    if kv_cache_for is not None:
        cache = kv_cache_for(cache.spec)
    return LLMEngine(config, model, load_tokenizer(model_dir), cache)


def _generate(engine: LLMEngine, max_tokens: int = 30) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    for _ in range(5000):
        for output in engine.step():
            assert output.error is None
            tokens[output.request_id].extend(output.new_token_ids)
        if not engine.has_work:
            return tokens
    raise AssertionError("the engine did not finish")


@pytest.fixture(scope="module")
def static_tokens(model_dir: Path) -> dict[str, list[int]]:
    return _generate(_engine(model_dir))


@pytest.mark.parametrize("layout", ["all_layers", "per_layer"])
def test_exhausted_budget_preempts_and_every_request_matches_static(model_dir, static_tokens, layout):
    def tight_cache(spec: KVCacheSpec) -> VAttentionKVCache:
        # Room for ~300 tokens: the longest request (150) fits alone, the batch of 7 does not.
        budget = 300 * spec.bytes_per_token
        return VAttentionKVCache(spec, PAGE, budget, layout=layout, backend=CpuMemoryBackend(), watermark=0.0)

    engine = _engine(model_dir, tight_cache)
    assert _generate(engine) == static_tokens
    assert engine.scheduler.num_preemptions_total > 0
    usage = engine.kv_cache.usage(0)
    assert usage.slots_in_use == 0 and usage.pages_mapped_total > 0
    engine.kv_cache.close()


def test_factory_built_vattention_engine_matches_static(model_dir, static_tokens):
    config = _config(model_dir, "vattention")
    engine = LLMEngine.from_config(config)
    assert isinstance(engine.kv_cache, VAttentionKVCache)
    pointers = [t.data_ptr() for t in engine.kv_cache.key_cache]
    assert _generate(engine) == static_tokens
    assert [t.data_ptr() for t in engine.kv_cache.key_cache] == pointers
    assert engine.kv_cache.stats.pages_mapped_ahead > 0  # decode pages were mapped off the critical path
    engine.kv_cache.close()


def test_idle_engine_gives_every_kv_page_back(model_dir):
    engine = LLMEngine.from_config(_config(model_dir, "vattention"))
    _generate(engine)
    assert engine.kv_cache.usage(0).bytes_mapped == 0  # finished requests' slots keep no pages once idle
    engine.add_request("gone", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.kv_cache.usage(0).bytes_mapped > 0
    engine.abort_request("gone")
    engine.step()
    assert not engine.has_work and engine.kv_cache.usage(0).bytes_mapped == 0
    engine.kv_cache.close()
