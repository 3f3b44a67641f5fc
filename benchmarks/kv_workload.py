"""The KV-memory benchmarks' shared workload: a realistic request mix and a model-free replay of the engine.

`request_mix` draws prompt and output lengths log-uniformly (prompts 16-2,000 tokens, outputs 16-512, as in
issue 3): many short requests, a long tail. `replay` drives the real Scheduler and a real KV cache as
LLMEngine.step does (schedule -> prepare_next_step -> advance computed tokens -> sample one token where a
chunk ends -> finish at the output length) but runs no model, so memory behaviour can be studied in seconds.
It never writes into the cache tensors. Benchmarks only: nothing here is imported by the package.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

from fusedserve.engine.config import SchedulerConfig
from fusedserve.engine.kv_cache import KVCache
from fusedserve.engine.request import Request, RequestStatus
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.scheduler import Scheduler

PROMPT_RANGE = (16, 2000)
OUTPUT_RANGE = (16, 512)


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(low), math.log(high)))))


def request_mix(num_requests: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt_len, output_len) pairs."""
    rng = random.Random(seed)
    return [(_log_uniform(rng, *PROMPT_RANGE), _log_uniform(rng, *OUTPUT_RANGE)) for _ in range(num_requests)]


def count_vmas() -> int:
    with open("/proc/self/maps") as maps:
        return sum(1 for _ in maps)


@dataclass
class ReplayResult:
    steps: int = 0
    seconds: float = 0.0
    max_running: int = 0
    preemptions: int = 0
    peak_mapped_bytes: int = 0
    live_bytes_at_peak: int = 0
    peak_live_bytes: int = 0
    max_vmas: int = 0
    mapped_byte_steps: int = 0  # sums over steps: their ratio is the time-averaged physical / live
    live_byte_steps: int = 0

    @property
    def mean_mapped_over_live(self) -> float:
        return self.mapped_byte_steps / max(1, self.live_byte_steps)

    @property
    def peak_mapped_over_live(self) -> float:
        return self.peak_mapped_bytes / max(1, self.live_bytes_at_peak)


def replay(
    kv_cache: KVCache,
    mix: list[tuple[int, int]],
    max_num_seqs: int,
    max_model_len: int,
    max_num_batched_tokens: int = 2048,
    vma_every: int = 0,
) -> ReplayResult:
    """Run the mix (all queued at t=0) through the scheduler and cache until every request finishes."""
    config = SchedulerConfig(max_num_seqs, max_model_len, max_num_batched_tokens)
    scheduler = Scheduler(config, kv_cache)
    targets: dict[str, int] = {}
    for index, (prompt_len, output_len) in enumerate(mix):
        request = Request(f"r{index}", [1] * prompt_len, SamplingParams(), prompt_len + output_len)
        targets[request.request_id] = output_len
        scheduler.add(request)
    result = ReplayResult()
    baseline_vmas = count_vmas() if vma_every else 0
    started = time.perf_counter()
    while scheduler.has_work:
        out = scheduler.schedule()
        if out.unservable:
            raise RuntimeError(f"{len(out.unservable)} requests can never fit this KV cache")
        result.preemptions += len(out.preempted)
        kv_cache.prepare_next_step(
            {c.request.slot: c.request.num_computed_tokens + c.num_tokens + 1 for c in out.chunks}
        )
        for chunk in out.chunks:
            request, samples = chunk.request, chunk.samples
            request.num_computed_tokens += chunk.num_tokens
            if samples:
                request.output_token_ids.append(1)
        result.max_running = max(result.max_running, len(scheduler.running))
        _account(result, kv_cache, scheduler.live_tokens())
        for chunk in out.chunks:
            request = chunk.request
            if request.num_output_tokens >= targets[request.request_id]:
                scheduler.remove(request, RequestStatus.FINISHED_LENGTH)
        if vma_every and result.steps % vma_every == 0:
            result.max_vmas = max(result.max_vmas, count_vmas() - baseline_vmas)
        result.steps += 1
    result.seconds = time.perf_counter() - started
    return result


def _account(result: ReplayResult, kv_cache: KVCache, live_tokens: int) -> None:
    usage = kv_cache.usage(live_tokens)
    result.peak_live_bytes = max(result.peak_live_bytes, usage.bytes_live)
    result.mapped_byte_steps += usage.bytes_mapped
    result.live_byte_steps += usage.bytes_live
    if usage.bytes_mapped > result.peak_mapped_bytes or (
        usage.bytes_mapped == result.peak_mapped_bytes and usage.bytes_live < result.live_bytes_at_peak
    ):
        result.peak_mapped_bytes = usage.bytes_mapped
        result.live_bytes_at_peak = usage.bytes_live
