"""The synchronous engine end to end on a tiny random Llama: batching, backends and preemption keep outputs exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.model.random_model import write_random_llama
from fusedserve.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny"), tokenizer_from=ensure_default_model())


def make_engine(model_dir: Path, **overrides) -> LLMEngine:
    cache = CacheConfig(
        kv_backend=overrides.pop("kv_backend", "static"),
        kv_cache_memory=overrides.pop("kv_cache_memory", None),
        kv_page_size=overrides.pop("kv_page_size", 64 * 1024),
    )
    scheduler = SchedulerConfig(
        max_num_seqs=overrides.pop("max_num_seqs", 8),
        max_model_len=overrides.pop("max_model_len", 256),
        max_num_batched_tokens=overrides.pop("max_num_batched_tokens", 64),
    )
    config = EngineConfig(ModelConfig(model_dir, "tiny", dtype="float32"), cache, scheduler, threads=1)
    return LLMEngine.from_config(config)


PROMPTS = [list(range(10, 10 + n)) for n in (5, 37, 12, 90, 3, 61)]


def generate_all(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 12) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    results: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished = set()
    for _ in range(10_000):
        for output in engine.step():
            results[output.request_id].extend(output.new_token_ids)
            if output.finished:
                assert output.finish_reason == "length"
                finished.add(output.request_id)
        if len(finished) == len(prompts):
            return results
    raise AssertionError("engine did not finish")


def test_batched_greedy_equals_one_request_at_a_time(tiny_model_dir: Path):
    batched = generate_all(make_engine(tiny_model_dir), PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = generate_all(make_engine(tiny_model_dir, max_num_seqs=1), [prompt])
        assert alone["r0"] == batched[f"r{i}"]


def test_chunked_prefill_gives_the_same_tokens(tiny_model_dir: Path):
    whole = generate_all(make_engine(tiny_model_dir, max_num_batched_tokens=256), PROMPTS)
    chunked = generate_all(make_engine(tiny_model_dir, max_num_batched_tokens=16), PROMPTS)
    assert whole == chunked


def test_vattention_backend_gives_the_same_tokens_as_static(tiny_model_dir: Path):
    static = generate_all(make_engine(tiny_model_dir), PROMPTS)
    paged = generate_all(make_engine(tiny_model_dir, kv_backend="vattention"), PROMPTS)
    assert static == paged


def page_group_bytes(model_dir: Path) -> int:
    """Physical bytes one slot maps for its first token: the unit in which a vAttention slot grows."""
    probe = make_engine(model_dir, kv_backend="vattention", max_model_len=1024)
    slot = probe.kv_cache.allocate_slot()
    assert slot is not None and probe.kv_cache.reserve_tokens(slot, 1)
    return probe.kv_cache.usage(1).bytes_mapped


def test_small_kv_budget_preempts_and_still_completes_every_request_exactly(tiny_model_dir: Path):
    group = page_group_bytes(tiny_model_dir)
    tokens_per_group = group // (2 * 2 * 2 * 16 * 4)  # layers x K/V x kv heads x head_dim x fp32
    # Each request starts within one page group and outgrows it; four groups cannot hold three grown requests.
    prompts = [list(range(10 + i * 300, 10 + i * 300 + tokens_per_group - 20 + i)) for i in range(3)]
    reference = generate_all(make_engine(tiny_model_dir, max_model_len=1024), prompts, max_tokens=60)
    engine = make_engine(tiny_model_dir, kv_backend="vattention", kv_cache_memory=4 * group, max_model_len=1024)
    squeezed = generate_all(engine, prompts, max_tokens=60)
    assert squeezed == reference
    assert engine.scheduler.num_preemptions_total > 0
    assert engine.kv_cache.usage(0).slots_in_use == 0


def test_abort_frees_the_slot(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir)
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.kv_cache.num_free_slots == 7
    engine.abort_request("a")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "abort")]
    assert engine.kv_cache.num_free_slots == 8 and not engine.has_work


def test_stop_token_ids_and_max_tokens_end_requests(tiny_model_dir: Path):
    engine = make_engine(tiny_model_dir)
    first = generate_all(engine, [PROMPTS[0]], max_tokens=5)["r0"]
    engine.add_request("s", PROMPTS[0], SamplingParams(temperature=0.0, stop_token_ids=[first[2]], max_tokens=5))
    outputs = []
    while engine.has_work:
        outputs.extend(engine.step())
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_reason == first[2]
    assert sum(len(o.new_token_ids) for o in outputs) == 3
