"""The serving half of the AdaptiVocab benchmark: one model folder behind a real `fusedserve serve` subprocess.

The server runs on a free loopback port; the same domain chat requests are sent with a fixed concurrency,
greedy sampling and ignore_eos, so every output has exactly max_tokens tokens. The caller picks max_tokens per
tokenizer so that outputs have the same expected length in characters. Reported per model: prompt and
completion tokens per request (from the OpenAI usage field), output characters, KV bytes per request (tokens x
layers x 2 x kv_heads x head_dim x dtype bytes) and requests per second. Benchmarks only; never imported by the
package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600.0
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ServeResult:
    model: str
    requests: int
    concurrency: int
    max_tokens: int
    seconds: float
    requests_per_s: float
    prompt_tokens_per_request: float
    completion_tokens_per_request: float
    completion_chars_per_request: float
    output_chars_per_s: float
    kv_bytes_per_request: float

    def as_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * DTYPE_BYTES[dtype]


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, flags: list[str]) -> Iterator[str]:
    """Start `fusedserve serve`, wait for /health, yield the base URL; SIGTERM (then kill) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "fusedserve.cli", "serve", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--disable-access-log", *flags]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; see {log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base}/health", timeout=2.0).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server did not become healthy; see {log_path}")
                time.sleep(1.0)
            yield base
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _send_all(base: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> list[dict]:
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(3600.0)) as client:

        async def one(prompt: str) -> dict:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            async with semaphore:
                response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def serve_benchmark(
    model_dir: Path,
    prompts: list[str],
    max_tokens: int,
    concurrency: int,
    dtype: str,
    log_path: Path,
    extra_flags: list[str],
) -> ServeResult:
    """Serve model_dir and send every prompt once (after one warm-up request); measure the whole batch."""
    flags = ["--dtype", dtype, "--max-num-seqs", str(concurrency), *extra_flags]
    with running_server(model_dir, log_path, flags) as base:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(_send_all(base, model, prompts[:1], 4, 1))
        started = time.perf_counter()
        replies = asyncio.run(_send_all(base, model, prompts, max_tokens, concurrency))
        seconds = time.perf_counter() - started
    count = len(replies)
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in replies) / count
    completion_tokens = sum(r["usage"]["completion_tokens"] for r in replies) / count
    chars = sum(len(r["choices"][0]["message"]["content"] or "") for r in replies) / count
    per_token = kv_bytes_per_token(model_dir, dtype)
    return ServeResult(
        model=str(model_dir),
        requests=count,
        concurrency=concurrency,
        max_tokens=max_tokens,
        seconds=round(seconds, 2),
        requests_per_s=round(count / seconds, 4),
        prompt_tokens_per_request=round(prompt_tokens, 1),
        completion_tokens_per_request=round(completion_tokens, 1),
        completion_chars_per_request=round(chars, 1),
        output_chars_per_s=round(chars * count / seconds, 1),
        kv_bytes_per_request=round((prompt_tokens + completion_tokens) * per_token),
    )
