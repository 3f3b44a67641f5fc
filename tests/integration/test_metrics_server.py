"""GET /metrics on the real server and default model: exact counters after N requests, and the running/waiting
gauges and KV usage back at 0 after finished and aborted (client gone) requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import DEFAULT_MODEL, Launcher, RunningServer
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "List three colours:"]
MAX_TOKENS = 8
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(server_launcher: Launcher) -> Iterator[RunningServer]:
    """One sequence at a time, so a second request provably waits while the first runs."""
    flags = ("--max-model-len", "1024", "--max-num-seqs", "1", "--disable-access-log")
    with server_launcher(*flags) as running:
        yield running


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(server: RunningServer) -> Samples:
    return parse(server.http().get("/metrics").text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": DEFAULT_MODEL, **labels}.items()))]


def idle(samples: Samples) -> bool:
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    return all(value(samples, gauge) == 0 for gauge in gauges)


def wait_for(server: RunningServer, condition: object, timeout: float = 60.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if condition(samples):  # type: ignore[operator]
            return samples
        assert time.monotonic() < deadline, f"/metrics never met the condition: {samples}"
        time.sleep(0.1)


def prompt_tokens(server: RunningServer, prompt: str) -> int:
    return int(server.http().post("/tokenize", json={"prompt": prompt}).json()["count"])


def test_metrics_exports_the_vllm_set_for_the_served_model(server: RunningServer) -> None:
    response = server.http().get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = parse(response.text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:e2e_request_latency_seconds_count", "fusedserve:kv_cache_bytes_mapped"):  # fmt: skip
        value(samples, name)
    assert value(samples, "vllm:request_success_total", finished_reason="abort") >= 0


def test_n_requests_move_the_counters_exactly(server: RunningServer) -> None:
    before = wait_for(server, idle)
    client = server.openai()
    prompt_total = 0
    for prompt in PROMPTS:
        completion = client.completions.create(
            model=DEFAULT_MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None and completion.usage.completion_tokens == MAX_TOKENS
        prompt_total += completion.usage.prompt_tokens
    after = wait_for(server, idle)
    n = len(PROMPTS)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == n
    assert delta("vllm:request_success_total", finished_reason="abort") == 0
    assert delta("vllm:prompt_tokens_total") == prompt_total
    assert delta("vllm:generation_tokens_total") == n * MAX_TOKENS
    assert delta("vllm:num_preemptions_total") == 0
    assert delta("vllm:request_prompt_tokens_count") == n
    assert delta("vllm:request_prompt_tokens_sum") == prompt_total
    assert delta("vllm:request_generation_tokens_sum") == n * MAX_TOKENS
    assert delta("vllm:time_to_first_token_seconds_count") == n
    assert delta("vllm:inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    assert delta("vllm:e2e_request_latency_seconds_count") == n
    assert delta("vllm:request_time_per_output_token_seconds_count") == n
    # Each prompt token is fed once, then every sampled token but the last.
    assert delta("vllm:iteration_tokens_total_sum") == prompt_total + n * (MAX_TOKENS - 1)


def test_gauges_and_kv_usage_return_to_zero_after_aborted_requests(server: RunningServer) -> None:
    before = wait_for(server, idle)
    running_prompt = "Write a very long story about a lighthouse keeper."
    asyncio.run(_run_then_abort_two_streams(server, running_prompt))
    after = wait_for(server, idle, timeout=30.0)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="abort") == 2
    assert delta("vllm:request_success_total", finished_reason="length") == 0
    # Only the running request reached the scheduler; the waiting one computed nothing.
    assert delta("vllm:prompt_tokens_total") == prompt_tokens(server, running_prompt)
    assert delta("vllm:request_queue_time_seconds_count") == 1
    assert delta("vllm:e2e_request_latency_seconds_count") == 2
    assert value(after, "fusedserve:kv_cache_bytes_live") == 0
    assert value(after, "fusedserve:kv_cache_slots_in_use") == 0


async def _run_then_abort_two_streams(server: RunningServer, running_prompt: str) -> None:
    """Stream A until its first token, queue B behind it, then drop B (waiting) and A (running)."""
    body = {"model": DEFAULT_MODEL, "max_tokens": 500, "stream": True, "ignore_eos": True, "temperature": 0.0}

    async def stream(client: httpx.AsyncClient, prompt: str, first_token: asyncio.Event) -> None:
        async with client.stream("POST", "/v1/completions", json={**body, "prompt": prompt}) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    first_token.set()

    async def until(condition: object) -> Samples:
        deadline = time.monotonic() + 60.0
        while True:
            samples = parse((await client.get("/metrics")).text)
            if condition(samples):  # type: ignore[operator]
                return samples
            assert time.monotonic() < deadline, f"/metrics never met the condition: {samples}"
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=server.base_url, timeout=120.0) as client:
        a_started, b_started = asyncio.Event(), asyncio.Event()
        a = asyncio.create_task(stream(client, running_prompt, a_started))
        await asyncio.wait_for(a_started.wait(), 120.0)
        b = asyncio.create_task(stream(client, "A second request that has to wait.", b_started))
        queued = await until(lambda s: value(s, "vllm:num_requests_waiting") == 1)
        assert value(queued, "vllm:num_requests_running") == 1
        assert value(queued, "vllm:kv_cache_usage_perc") > 0
        assert value(queued, "fusedserve:kv_cache_bytes_live") > 0
        b.cancel()  # the client goes away while its request waits
        await until(lambda s: value(s, "vllm:num_requests_waiting") == 0)
        assert not b_started.is_set()
        a.cancel()  # and while the other runs
        await until(lambda s: value(s, "vllm:num_requests_running") == 0)
        for task in (a, b):
            with pytest.raises(asyncio.CancelledError):
                await task
