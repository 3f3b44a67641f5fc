"""Faults inside the engine, injected into a real in-process server on a tiny random Llama.

One request's step going wrong (its sampler raising, or the model giving its row non-finite logits) fails that
request alone: a 500 OpenAI error before the response starts, an error event once streaming, while requests
batched with it finish with exactly the tokens they get alone. The engine thread dying (the model forward
raising) turns /health and every new request into a 503 at once, and in-flight requests end with an error
instead of hanging. Faults are injected by patching this one engine instance's runner; shipped code has no
fault hooks. The poisoned request is marked by its seed, so it is found inside a batch.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn

from fusedserve.engine.async_engine import AsyncEngine
from fusedserve.engine.config import EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.model.random_model import write_random_llama
from fusedserve.engine.request import Request
from fusedserve.server.app import create_app
from fusedserve.server.config import ServerConfig
from fusedserve.server.metrics import EngineMetrics

pytestmark = pytest.mark.slow

MODEL = "tiny"
POISON_SEED = 4242  # the request whose step the injected fault hits
PROMPTS = ["Count to ten.", "Name a colour.", "Say hello in French."]
QUICK_S = 5.0  # "at once" on a loaded 2-core machine: the paths measured here take milliseconds
STEP_PACE_S = 0.02  # every engine step lasts at least this, so a 200-token request is in flight for 4 s or more


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny-faults"), tokenizer_from=ensure_default_model())


@dataclass
class InProcessServer:
    """uvicorn serving create_app() in a thread of this process, so a test can reach into its engine."""

    engine: AsyncEngine
    base_url: str

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(tiny_model_dir: Path) -> Iterator[InProcessServer]:
    config = EngineConfig(
        ModelConfig(tiny_model_dir, MODEL, dtype="float32"),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=256),
        threads=1,
    )
    metrics = EngineMetrics(MODEL, config.scheduler.max_model_len, process_metrics=False)
    engine = AsyncEngine.from_config(config, observer=metrics)
    app = create_app(engine, ServerConfig(served_model_names=[MODEL]), metrics.registry)
    port = _free_port()
    uvicorn_server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uvicorn_server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uvicorn_server.started, "the in-process server did not start"
    try:
        yield InProcessServer(engine, f"http://127.0.0.1:{port}")
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
        engine.shutdown()


class Poison:
    """Finds the poisoned request (marked by its seed) in a batch. It is hit from the first step it shares with
    other requests once it has `min_tokens` output tokens, and in every call after (the engine's one-by-one
    retry included), so the fault always lands in a batch that other requests are part of."""

    def __init__(self, min_tokens: int = 0) -> None:
        self.min_tokens = min_tokens
        self.hit: set[str] = set()

    def rows(self, requests: list[Request]) -> list[int]:
        if len(requests) > 1:
            for request in requests:
                if request.params.seed == POISON_SEED and request.num_output_tokens >= self.min_tokens:
                    self.hit.add(request.request_id)
        return [i for i, request in enumerate(requests) if request.request_id in self.hit]


def _chat_body(content: str, max_tokens: int = 12, **fields: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **fields}


async def _chat(server: InProcessServer, content: str, **fields: Any) -> str:
    async with server.client() as client:
        response = await client.chat.completions.create(
            **_chat_body(content, **fields), extra_body={"ignore_eos": True}
        )
    assert response.choices[0].finish_reason == "length"
    return response.choices[0].message.content or ""


def _references(server: InProcessServer) -> list[str]:
    """Each prompt's greedy reply, alone, before any fault is injected."""
    return [asyncio.run(_chat(server, prompt)) for prompt in PROMPTS]


async def _poisoned_with_neighbours(server: InProcessServer) -> tuple[BaseException | str, list[Any]]:
    """The poisoned request's outcome and its neighbours' replies (or exceptions), all run concurrently."""
    poisoned = asyncio.ensure_future(_chat(server, "Tell me a story.", max_tokens=200, seed=POISON_SEED))
    await asyncio.sleep(0.2)  # the poisoned request is running before its neighbours arrive
    neighbours = await asyncio.gather(*(_chat(server, prompt) for prompt in PROMPTS), return_exceptions=True)
    outcome = await asyncio.gather(poisoned, return_exceptions=True)
    return outcome[0], list(neighbours)


def _pace(runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow every step of the tiny model down to STEP_PACE_S, so requests overlap however fast the machine."""
    original_run = runner.run

    def paced_run(scheduled: Any) -> tuple[list[Request], torch.Tensor]:
        time.sleep(STEP_PACE_S)
        return original_run(scheduled)

    monkeypatch.setattr(runner, "run", paced_run)


def _failing_sampler(original: Callable[..., Any], poison: Poison) -> Callable[..., Any]:
    """The runner's sample(), except that it raises whenever the poisoned request is in the batch."""

    def sample(requests: list[Request], logits: torch.Tensor) -> Any:
        if poison.rows(requests):
            raise RuntimeError("injected sampler fault")
        return original(requests, logits)

    return sample


def test_sampler_failure_is_a_500_for_its_request_only(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    references = _references(server)
    runner = server.engine.engine.runner
    _pace(runner, monkeypatch)
    monkeypatch.setattr(runner, "sample", _failing_sampler(runner.sample, Poison(min_tokens=3)))
    poisoned, neighbours = asyncio.run(_poisoned_with_neighbours(server))
    assert isinstance(poisoned, openai.InternalServerError) and poisoned.status_code == 500
    assert poisoned.body["code"] == "generation_failed" and "injected sampler fault" in poisoned.body["message"]
    assert neighbours == references
    assert server.http().get("/health").status_code == 200


def test_non_finite_logits_fail_only_their_request(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    references = _references(server)
    runner = server.engine.engine.runner
    _pace(runner, monkeypatch)
    original_run, poison = runner.run, Poison()

    def run_with_nan_row(scheduled: Any) -> tuple[list[Request], torch.Tensor]:
        requests, logits = original_run(scheduled)
        rows = poison.rows(requests)
        if rows:
            logits = logits.clone()  # the runner's tensor is an inference tensor: edit a copy
            logits[rows, 7] = float("nan")
        return requests, logits

    monkeypatch.setattr(runner, "run", run_with_nan_row)
    poisoned, neighbours = asyncio.run(_poisoned_with_neighbours(server))
    assert isinstance(poisoned, openai.InternalServerError) and poisoned.status_code == 500
    assert "non-finite logits" in poisoned.body["message"]
    assert neighbours == references


def _stream_events(
    server: InProcessServer, body: dict[str, Any], started: threading.Event | None = None
) -> list[str]:
    """The data of every SSE event of a chat stream; `started` is set at the first one."""
    events = []
    with server.http().stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if started is not None:
                    started.set()
    return events


def _stream_in_background(
    server: InProcessServer, body: dict[str, Any]
) -> tuple[threading.Thread, dict[str, list[str]]]:
    """Start a stream in a thread; return once its first event has arrived. result["events"] is filled at the end."""
    result: dict[str, list[str]] = {}
    started = threading.Event()
    thread = threading.Thread(target=lambda: result.update(events=_stream_events(server, body, started)))
    thread.start()
    assert started.wait(60)
    return thread, result


def test_sampler_failure_mid_stream_ends_with_an_error_event(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = server.engine.engine.runner
    _pace(runner, monkeypatch)
    monkeypatch.setattr(runner, "sample", _failing_sampler(runner.sample, Poison(min_tokens=3)))
    neighbour, result = _stream_in_background(server, _chat_body(PROMPTS[0], 200, stream=True, ignore_eos=True))
    events = _stream_events(server, _chat_body("A story.", 40, stream=True, ignore_eos=True, seed=POISON_SEED))
    neighbour.join(60)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "generation_failed" and "injected sampler fault" in error["message"]
    assert any(json.loads(event).get("choices") for event in events[:-2])  # it had started streaming
    neighbour_events = result["events"]
    finishes = [choice["finish_reason"] for event in neighbour_events[:-1] for choice in json.loads(event)["choices"]]
    assert finishes[-1] == "length" and neighbour_events[-1] == "[DONE]"


def _timed(action: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = action()
    return response, time.monotonic() - started


def test_dead_engine_thread_is_503_at_once_and_nothing_hangs(
    server: InProcessServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = server.engine.engine.runner
    _pace(runner, monkeypatch)
    original_run = runner.run

    def run_or_die(scheduled: Any) -> tuple[list[Request], torch.Tensor]:
        if any(chunk.request.params.seed == POISON_SEED for chunk in scheduled.chunks):
            raise RuntimeError("injected device failure")
        return original_run(scheduled)

    monkeypatch.setattr(runner, "run", run_or_die)
    streamer, in_flight = _stream_in_background(server, _chat_body(PROMPTS[1], 200, stream=True, ignore_eos=True))
    http = server.http()
    killer, killer_s = _timed(lambda: http.post("/v1/chat/completions", json=_chat_body("x", seed=POISON_SEED)))
    assert killer.status_code == 503 and killer.json()["error"]["code"] == "engine_dead"
    streamer.join(QUICK_S)
    assert not streamer.is_alive()
    assert json.loads(in_flight["events"][-2])["error"]["code"] == "engine_dead"
    health, health_s = _timed(lambda: http.get("/health"))
    assert health.status_code == 503
    fresh, fresh_s = _timed(lambda: http.post("/v1/chat/completions", json=_chat_body(PROMPTS[0])))
    assert fresh.status_code == 503 and fresh.json()["error"]["type"] == "server_error"
    fresh_stream, stream_s = _timed(lambda: http.post("/v1/completions", json={"prompt": "hi", "stream": True}))
    assert fresh_stream.status_code == 503
    assert max(killer_s, health_s, fresh_s, stream_s) < QUICK_S
