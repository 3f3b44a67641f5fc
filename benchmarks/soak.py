"""Soak: a real server under mixed traffic for a fixed time; every valid request must succeed with the right text.

`--concurrency` workers (default 32) send requests until `--duration` (default 600 s) runs out, each drawn
(seeded) from three kinds:
- valid: chat or completion, streamed or not, greedy; its text and finish reason must equal the reference taken
  for that prompt alone before the soak (the server runs --dtype float32, whose greedy output does not depend on
  how requests are batched);
- invalid: a malformed request that must get its expected 4xx as OpenAI error JSON;
- aborted: a long stream that the client leaves after 0.05-1 s.
Memory: KV (slots, live and mapped bytes) and the server's RSS are read from /metrics once the server is idle,
after a warm-up burst at full concurrency and again after the soak; every 5 s a sample tracks them during it.
Prints a table, writes JSON and a PNG (RSS and KV over time); exits 1 if a valid request failed or differed, an
invalid one got anything but its 4xx, or memory did not come back (KV to its baseline, RSS within tolerance).

    python benchmarks/soak.py                          # 10 minutes at concurrency 32, on its own server
    python benchmarks/soak.py --duration 180           # shorter
    python benchmarks/soak.py --base-url http://127.0.0.1:8000 --model NAME   # a server already running
                                                       # (start it with --dtype float32 for exact references)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_process import running_server  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
SERVER_ARGS = ["-m", "fusedserve.cli", "serve", "--threads", "1", "--dtype", "float32", "--max-model-len", "512",
               "--max-num-seqs", "32", "--disable-access-log"]  # fmt: skip
PROMPTS = [
    "Name three fruits.", "What is the capital of France?", "Write a haiku about the sea.",
    "Explain gravity in one sentence.", "Count from one to five.", "Give me a synonym for happy.",
    "What colour is the sky?", "Say good morning in Spanish.",
]  # fmt: skip
MAX_TOKENS = 16
KIND_WEIGHTS = {"valid": 0.6, "invalid": 0.2, "aborted": 0.2}
GAUGES = {
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv_slots_in_use": "fusedserve:kv_cache_slots_in_use",
    "kv_bytes_live": "fusedserve:kv_cache_bytes_live",
    "kv_bytes_mapped": "fusedserve:kv_cache_bytes_mapped",
    "rss_bytes": "process_resident_memory_bytes",
}


def invalid_cases(model: str) -> list[tuple[str, str, Any, int]]:
    """(method, path, JSON body or raw bytes, expected status)."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("POST", "/v1/chat/completions", {**chat, "temperature": 5}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}, 400),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("POST", "/v1/chat/completions", {**chat, "n": 0}, 400),
        ("POST", "/v1/chat/completions", {**chat, "max_tokens": 10**12}, 400),
        ("POST", "/v1/chat/completions", {**chat, "logit_bias": {"abc": 1}}, 400),
        ("POST", "/v1/chat/completions", {**chat, "stop": ["a", "b", "c", "d", "e"]}, 400),
        ("POST", "/v1/chat/completions", {**chat, "unknown_field": 1}, 400),
        ("POST", "/v1/chat/completions", {**chat, "model": "no-such-model"}, 404),
        ("POST", "/v1/completions", {"model": model, "prompt": "\ud800"}, 400),
        ("POST", "/v1/completions", {"model": model, "prompt": [10**9]}, 400),
        ("POST", "/v1/completions", b'{"prompt": "unterminated', 400),
        ("POST", "/v1/completions", b"\xff\xfe not utf-8", 400),
        ("GET", "/v1/completions", None, 405),
    ]


@dataclass
class Tally:
    """What the soak saw, by kind and outcome."""

    sent: Counter[str] = field(default_factory=Counter)
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(f"{kind}: {detail}")


def parse_gauges(metrics_text: str) -> dict[str, float]:
    """GAUGES from a /metrics page, each summed over its labels."""
    names = {name: key for key, name in GAUGES.items()}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in names:
                values[names[sample.name]] = values.get(names[sample.name], 0.0) + sample.value
    return values


def read_gauges(client: httpx.Client) -> dict[str, float]:
    return parse_gauges(client.get("/metrics").text)


def wait_until_idle(client: httpx.Client, timeout: float = 120.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    gauges = read_gauges(client)
    while time.monotonic() < deadline and (gauges["running"] or gauges["waiting"] or gauges["kv_slots_in_use"]):
        time.sleep(0.5)
        gauges = read_gauges(client)
    return gauges


def valid_body(model: str, endpoint: str, prompt: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0.0, "stream": stream}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def path_of(endpoint: str) -> str:
    return "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"


async def run_valid(client: httpx.AsyncClient, model: str, endpoint: str, prompt: str, stream: bool) -> tuple[str, str]:
    """(text, finish_reason) of one greedy request; raises on any error."""
    body = valid_body(model, endpoint, prompt, stream)
    if not stream:
        response = await client.post(path_of(endpoint), json=body)
        response.raise_for_status()
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        return text, choice["finish_reason"]
    parts, finish = [], ""
    async with client.stream("POST", path_of(endpoint), json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            for choice in event["choices"]:
                parts.append((choice.get("delta") or {}).get("content") or choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
    return "".join(parts), finish


async def run_invalid(client: httpx.AsyncClient, case: tuple[str, str, Any, int]) -> str | None:
    """None if the case got its expected 4xx OpenAI error, else what went wrong."""
    method, path, body, expected = case
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    response = await client.request(method, path, content=content, headers={"Content-Type": "application/json"})
    if response.status_code != expected:
        return f"{method} {path} expected {expected}, got {response.status_code}: {response.text[:200]}"
    error = response.json().get("error")
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"{method} {path}: not OpenAI error JSON: {response.text[:200]}"
    return None


async def run_aborted(client: httpx.AsyncClient, model: str, rng: random.Random) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "max_tokens": 300,
            "ignore_eos": True, "stream": True}  # fmt: skip
    try:
        async with asyncio.timeout(rng.uniform(0.05, 1.0)):
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    pass
    except TimeoutError:
        pass


async def worker(client: httpx.AsyncClient, model: str, seed: int, deadline: float, references: dict, tally: Tally,
                 bar: tqdm) -> None:  # fmt: skip
    rng = random.Random(seed)
    invalid = invalid_cases(model)
    kinds, weights = list(KIND_WEIGHTS), list(KIND_WEIGHTS.values())
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        tally.sent[kind] += 1
        try:
            if kind == "valid":
                endpoint, prompt, stream = rng.choice(["chat", "completion"]), rng.choice(PROMPTS), rng.random() < 0.5
                got, expected = await run_valid(client, model, endpoint, prompt, stream), references[(endpoint, prompt)]
                if got != expected:
                    tally.fail(kind, f"{endpoint} {prompt!r} stream={stream}: {got} != {expected}")
                    continue
            elif kind == "invalid":
                problem = await run_invalid(client, rng.choice(invalid))
                if problem:
                    tally.fail(kind, problem)
                    continue
            else:
                await run_aborted(client, model, rng)
            tally.ok[kind] += 1
        except Exception as error:  # noqa: BLE001 - every failure is counted and reported, none stops the soak
            tally.fail(kind, f"{type(error).__name__}: {error}")
        finally:
            bar.set_postfix({k: f"{tally.ok[k]}/{tally.sent[k]}" for k in kinds}, refresh=False)


async def sampler(client: httpx.AsyncClient, deadline: float, samples: list[dict[str, float]], bar: tqdm) -> None:
    started = time.monotonic()
    while time.monotonic() < deadline:
        values = parse_gauges((await client.get("/metrics")).text)
        samples.append({"t": time.monotonic() - started, **values})
        bar.n = min(bar.total, int(time.monotonic() - started))
        bar.refresh()
        await asyncio.sleep(5.0)


async def soak(base_url: str, model: str, concurrency: int, duration: float, seed: int, references: dict
               ) -> tuple[Tally, list[dict[str, float]], float]:  # fmt: skip
    tally, samples = Tally(), []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as client:
        started = time.monotonic()
        deadline = started + duration
        with tqdm(total=int(duration), unit="s", desc="soak") as bar:
            tasks = [worker(client, model, seed + i, deadline, references, tally, bar) for i in range(concurrency)]
            await asyncio.gather(sampler(client, deadline, samples, bar), *tasks)
    return tally, samples, time.monotonic() - started


async def take_references(base_url: str, model: str) -> dict[tuple[str, str], tuple[str, str]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        return {
            (endpoint, prompt): await run_valid(client, model, endpoint, prompt, stream=False)
            for endpoint in ("chat", "completion")
            for prompt in PROMPTS
        }


async def warm_up(base_url: str, model: str, concurrency: int) -> None:
    """One burst at full concurrency, so the baseline includes what a full batch allocates once."""
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        jobs = [run_valid(client, model, "chat", PROMPTS[i % len(PROMPTS)], False) for i in range(concurrency)]
        await asyncio.gather(*jobs)


def plot(samples: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot(t, [s.get("rss_bytes", 0) / 2**20 for s in samples], label="server RSS (MiB)")
    left.plot(t, [s.get("kv_bytes_mapped", 0) / 2**20 for s in samples], label="KV mapped (MiB)")
    left.set_xlabel("seconds into the soak")
    left.set_ylabel("MiB")
    right = left.twinx()
    right.plot(t, [s.get("running", 0) + s.get("waiting", 0) for s in samples], "k:", label="running+waiting")
    right.set_ylabel("requests in the engine")
    left.legend(loc="center left")
    right.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(args: argparse.Namespace, references: dict, tally: Tally, samples: list, seconds: float,
           before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    rss_growth = after["rss_bytes"] - before["rss_bytes"]
    memory_back = after["kv_bytes_mapped"] <= before["kv_bytes_mapped"] and after["kv_bytes_live"] == 0
    memory_back = memory_back and after["kv_slots_in_use"] == 0 and rss_growth <= args.rss_tolerance_mib * 2**20
    valid_errors = tally.sent["valid"] - tally.ok["valid"]
    invalid_errors = tally.sent["invalid"] - tally.ok["invalid"]
    summary = {
        "duration_s": round(seconds, 1), "concurrency": args.concurrency, "seed": args.seed,
        "requests_sent": sum(tally.sent.values()), "sent": dict(tally.sent), "ok": dict(tally.ok),
        "valid_errors": valid_errors, "invalid_errors": invalid_errors,
        "valid_requests_per_s": round(tally.ok["valid"] / seconds, 2), "references": len(references),
        "before": before, "after": after, "rss_growth_mib": round(rss_growth / 2**20, 1),
        "rss_max_mib": round(max(s.get("rss_bytes", 0) for s in samples) / 2**20, 1) if samples else None,
        "kv_mapped_max_mib": round(max(s.get("kv_bytes_mapped", 0) for s in samples) / 2**20, 1) if samples else None,
        "memory_back_to_baseline": memory_back, "passed": valid_errors == 0 and invalid_errors == 0 and memory_back,
    }  # fmt: skip
    print(f"\n{'kind':10} {'sent':>7} {'ok':>7}")
    for kind in KIND_WEIGHTS:
        print(f"{kind:10} {tally.sent[kind]:7d} {tally.ok[kind]:7d}")
    print(f"{'memory':10} {'before':>12} {'after':>12}")
    for key in ("rss_bytes", "kv_bytes_mapped", "kv_bytes_live", "kv_slots_in_use"):
        scale = 2**20 if key.endswith("bytes") else 1
        print(f"{key:16} {before[key] / scale:10.1f} {after[key] / scale:10.1f}")
    for failure in tally.failures[:20]:
        print("FAIL", failure)
    print("PASSED" if summary["passed"] else "FAILED", json.dumps({k: summary[k] for k in ("valid_errors",
          "invalid_errors", "rss_growth_mib", "memory_back_to_baseline")}))  # fmt: skip
    return {"summary": summary, "failures": tally.failures, "samples": samples}


def run(args: argparse.Namespace, base_url: str) -> int:
    """Warm up, take the references, soak, report; `base_url` is the server's root (or its /v1) URL."""
    root = base_url.removesuffix("/").removesuffix("/v1")
    asyncio.run(warm_up(root, args.model, args.concurrency))
    references = asyncio.run(take_references(root, args.model))
    with httpx.Client(base_url=root, timeout=60) as metrics_client:
        before = wait_until_idle(metrics_client)
        tally, samples, seconds = asyncio.run(
            soak(root, args.model, args.concurrency, args.duration, args.seed, references)
        )
        after = wait_until_idle(metrics_client)
    result = report(args, references, tally, samples, seconds, before, after)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if samples:
        plot(samples, args.out.with_suffix(".png"))
    print(f"wrote {args.out}")
    return 0 if result["summary"]["passed"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of mixed traffic (default 600)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-tolerance-mib", type=float, default=64.0, help="allowed RSS growth over the soak")
    parser.add_argument("--base-url", default=None, help="a running server's URL (default: start one)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    if args.base_url:
        return run(args, args.base_url)
    with running_server(SERVER_ARGS, Path("/tmp/fusedserve-soak-server.log")) as base_url:
        return run(args, base_url)


if __name__ == "__main__":
    sys.exit(main())
