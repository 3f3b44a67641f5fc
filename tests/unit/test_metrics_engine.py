"""EngineMetrics observing the real LLMEngine on a tiny random Llama: exact counts, and gauges back at 0."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.model.random_model import write_random_llama
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.server.metrics import EngineMetrics

MODEL = "tiny"
PROMPTS = [list(range(10, 10 + n)) for n in (5, 37, 12, 90, 3, 61)]
MAX_TOKENS = 6
IDLE_GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "fusedserve:kv_cache_bytes_live",
    "fusedserve:kv_cache_slots_in_use",
)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny"), tokenizer_from=ensure_default_model())


def make_engine(model_dir: Path, kv_backend: str = "static", **scheduler: int) -> tuple[LLMEngine, EngineMetrics]:
    """The tiny model on one thread; `scheduler` overrides SchedulerConfig fields (and takes kv_cache_memory)."""
    memory = scheduler.pop("kv_cache_memory", None)
    cache = CacheConfig(kv_backend=kv_backend, kv_cache_memory=memory, kv_page_size=64 * 1024)
    config = EngineConfig(
        ModelConfig(model_dir, MODEL, dtype="float32"),
        cache,
        SchedulerConfig(**{"max_model_len": 256, "max_num_batched_tokens": 64, "max_num_seqs": 8, **scheduler}),
        threads=1,
    )
    metrics = EngineMetrics(MODEL, config.scheduler.max_model_len, process_metrics=False)
    return LLMEngine.from_config(config, observer=metrics), metrics


def value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})
    assert sample is not None, f"{name}{labels} is not exported"
    return sample


def run_until_idle(engine: LLMEngine) -> None:
    for _ in range(10_000):
        if not engine.has_work:
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def params(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("kv_backend", ["static", "vattention"])
def test_n_requests_give_exact_counters_and_histogram_counts(tiny_model_dir: Path, kv_backend: str) -> None:
    engine, metrics = make_engine(tiny_model_dir, kv_backend)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, params())
    run_until_idle(engine)
    n, prompt_tokens = len(PROMPTS), sum(map(len, PROMPTS))
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == n
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 0
    assert value(metrics, "vllm:prompt_tokens_total") == prompt_tokens
    assert value(metrics, "vllm:generation_tokens_total") == n * MAX_TOKENS
    assert value(metrics, "vllm:num_preemptions_total") == 0
    # Every prompt token is fed once, and every sampled token but each request's last.
    assert value(metrics, "vllm:iteration_tokens_total_sum") == prompt_tokens + n * (MAX_TOKENS - 1)
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == n
    assert value(metrics, "vllm:inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    phases = ("e2e_request_latency", "request_queue_time", "request_prefill_time", "request_decode_time")
    for histogram in (*phases, "request_time_per_output_token"):
        assert value(metrics, f"vllm:{histogram}_seconds_count") == n, histogram
    assert value(metrics, "vllm:request_prompt_tokens_sum") == prompt_tokens
    assert value(metrics, "vllm:request_generation_tokens_sum") == n * MAX_TOKENS
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="5.0") == 0
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="10.0") == n
    steps_run = value(metrics, "vllm:iteration_tokens_total_count")
    assert value(metrics, "fusedserve:engine_step_seconds_count") == steps_run
    for gauge in IDLE_GAUGES:
        assert value(metrics, gauge) == 0, gauge
    assert value(metrics, "fusedserve:kv_cache_bytes_budget") > 0


def test_gauges_follow_the_queues_and_return_to_zero_after_aborts(tiny_model_dir: Path) -> None:
    engine, metrics = make_engine(tiny_model_dir, "vattention", max_num_seqs=1)
    for i in range(3):
        engine.add_request(f"r{i}", PROMPTS[i], params(max_tokens=50))
    engine.step()
    engine.step()
    assert value(metrics, "vllm:num_requests_running") == 1
    assert value(metrics, "vllm:num_requests_waiting") == 2
    assert value(metrics, "vllm:kv_cache_usage_perc") > 0
    assert value(metrics, "fusedserve:kv_cache_bytes_live") > 0
    engine.abort_request("r1")  # still waiting
    engine.abort_request("r0")  # running
    engine.step()
    assert value(metrics, "vllm:num_requests_waiting") == 0
    engine.abort_request("r2")  # now running
    run_until_idle(engine)
    assert value(metrics, "vllm:request_success_total", finished_reason="abort") == 3
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 0
    # r1 never reached the front of the queue; r0 and r2 did.
    assert value(metrics, "vllm:request_queue_time_seconds_count") == 2
    assert value(metrics, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(metrics, "vllm:prompt_tokens_total") == len(PROMPTS[0]) + len(PROMPTS[2])
    for gauge in IDLE_GAUGES:
        assert value(metrics, gauge) == 0, gauge


def test_preemptions_are_counted_and_recompute_is_not_prompt(tiny_model_dir: Path) -> None:
    # The unit a vAttention slot grows by; each request starts within one and outgrows it, four cannot hold three.
    probe, _ = make_engine(tiny_model_dir, "vattention", max_model_len=1024)
    slot = probe.kv_cache.allocate_slot()
    assert slot is not None and probe.kv_cache.reserve_tokens(slot, 1)
    group = probe.kv_cache.usage(1).bytes_mapped
    tokens_per_group = group // probe.kv_cache.spec.bytes_per_token
    prompts = [list(range(10 + i * 300, 10 + i * 300 + tokens_per_group - 20 + i)) for i in range(3)]
    engine, metrics = make_engine(tiny_model_dir, "vattention", kv_cache_memory=4 * group, max_model_len=1024)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params(max_tokens=60))
    run_until_idle(engine)
    assert engine.scheduler.num_preemptions_total > 0
    assert value(metrics, "vllm:num_preemptions_total") == engine.scheduler.num_preemptions_total
    prompt_tokens = sum(map(len, prompts))
    assert value(metrics, "vllm:prompt_tokens_total") == prompt_tokens
    assert value(metrics, "vllm:generation_tokens_total") == 60 * len(prompts)
    # Recomputed tokens are scheduled again: more than the no-preemption total.
    assert value(metrics, "vllm:iteration_tokens_total_sum") > prompt_tokens + len(prompts) * 59
    for gauge in IDLE_GAUGES:
        assert value(metrics, gauge) == 0, gauge
