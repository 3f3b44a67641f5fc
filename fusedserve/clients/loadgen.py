"""A load generator for any OpenAI-compatible server: streams completions at a fixed concurrency and measures.

It talks HTTP only (httpx, the same wire format the openai SDK uses) and measures what users feel: time to first
token, inter-token latency, request and token throughput. Output length is fixed by asking for `ignore_eos` and
`min_tokens` (vLLM extensions; servers that ignore them produce shorter outputs, which the report shows).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestRecord:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    output_chars: int = 0
    prompt_tokens: int = 0
    token_gaps: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class LoadResult:
    label: str
    concurrency: int
    num_requests: int
    errors: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    output_chars_per_s: float
    mean_output_tokens: float
    mean_prompt_tokens: float
    ttft_p50: float
    ttft_p99: float
    itl_p50: float
    itl_p99: float

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def stream_one(
    client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int, extra: dict | None = None
) -> RequestRecord:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "min_tokens": max_tokens,
        **(extra or {}),
    }
    start = time.perf_counter()
    record = RequestRecord(ok=False)
    last = start
    try:
        async with client.stream("POST", "/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = str(event["error"])
                    return record
                if event.get("usage"):
                    record.output_tokens = event["usage"]["completion_tokens"]
                    record.prompt_tokens = event["usage"]["prompt_tokens"]
                for choice in event.get("choices", []):
                    text = choice.get("text") or ""
                    if not text:
                        continue
                    now = time.perf_counter()
                    if record.output_chars == 0:
                        record.ttft = now - start
                    else:
                        record.token_gaps.append(now - last)
                    last = now
                    record.output_chars += len(text)
        record.latency = time.perf_counter() - start
        record.ok = True
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    return record


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    label: str = "",
    api_key: str = "EMPTY",
    extra: dict | None = None,
) -> LoadResult:
    """Send every prompt once, at most `concurrency` in flight, and summarise."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    records: list[RequestRecord] = []
    headers = {"Authorization": f"Bearer {api_key}"}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                records.append(await stream_one(client, model, prompt, max_tokens, extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    good = [r for r in records if r.ok]
    gaps = [g for r in good for g in r.token_gaps]
    return LoadResult(
        label=label,
        concurrency=concurrency,
        num_requests=len(records),
        errors=len(records) - len(good),
        seconds=seconds,
        requests_per_s=len(good) / seconds,
        output_tokens_per_s=sum(r.output_tokens for r in good) / seconds,
        output_chars_per_s=sum(r.output_chars for r in good) / seconds,
        mean_output_tokens=statistics.fmean([r.output_tokens for r in good]) if good else 0.0,
        mean_prompt_tokens=statistics.fmean([r.prompt_tokens for r in good]) if good else 0.0,
        ttft_p50=percentile([r.ttft for r in good], 50),
        ttft_p99=percentile([r.ttft for r in good], 99),
        itl_p50=percentile(gaps, 50),
        itl_p99=percentile(gaps, 99),
    )
