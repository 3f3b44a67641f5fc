"""The serving benchmark's workload run on the engine alone: no HTTP, no asyncio, no detokenizer.

Same prompts, same output length, same closed loop (a new request the moment one finishes, `concurrency` in
flight), stepped directly on `LLMEngine`. Side by side with the served numbers it splits a gap to a target into
what the engine costs and what serving it costs. Reported as a `LoadResult` labelled "engine-only".
"""

from __future__ import annotations

import time
from pathlib import Path

from fusedserve.clients.loadgen import LoadResult, percentile
from fusedserve.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.sampling_params import SamplingParams


def replay(
    model_dir: Path, prompts: list[str], concurrency: int, max_tokens: int, threads: int | None
) -> LoadResult:
    config = EngineConfig(
        model=ModelConfig(model_dir=model_dir, served_model_name="engine-only"),
        scheduler=SchedulerConfig(max_model_len=2048),  # what serve_bench gives the server
        threads=threads,
    )
    engine = LLMEngine.from_config(config)
    try:
        return _closed_loop(engine, prompts, concurrency, max_tokens)
    finally:
        engine.kv_cache.close()


def _closed_loop(engine: LLMEngine, prompts: list[str], concurrency: int, max_tokens: int) -> LoadResult:
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=0.0)
    prompt_ids = [engine.tokenizer.encode(p) for p in prompts]
    engine.add_request("warm-up", prompt_ids[0][:8], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_work:
        engine.step()

    sent: dict[str, float] = {}
    last_token: dict[str, float] = {}
    ttfts: list[float] = []
    gaps: list[float] = []
    output_tokens = 0
    next_index = 0

    def submit() -> None:
        nonlocal next_index
        request_id = str(next_index)
        engine.add_request(request_id, prompt_ids[next_index], params)
        sent[request_id] = time.perf_counter()
        next_index += 1

    start = time.perf_counter()
    for _ in range(min(concurrency, len(prompts))):
        submit()
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            rid = output.request_id
            if output.new_token_ids:
                output_tokens += len(output.new_token_ids)
                if rid in last_token:
                    gaps.append(now - last_token[rid])
                else:
                    ttfts.append(now - sent[rid])
                last_token[rid] = now
            if output.finished and next_index < len(prompts):
                submit()
    seconds = time.perf_counter() - start
    count = len(prompts)
    return LoadResult(
        label="engine-only",
        concurrency=concurrency,
        num_requests=count,
        errors=0,
        seconds=seconds,
        requests_per_s=count / seconds,
        output_tokens_per_s=output_tokens / seconds,
        output_chars_per_s=float("nan"),  # no detokenizer here, by design
        mean_output_tokens=output_tokens / count,
        mean_prompt_tokens=sum(map(len, prompt_ids)) / count,
        ttft_p50=percentile(ttfts, 50),
        ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
    )
