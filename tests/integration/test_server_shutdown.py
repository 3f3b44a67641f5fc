"""SIGTERM: stop accepting, let in-flight requests finish within the grace period, then exit 0."""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


def stream_in_background(server: RunningServer, max_tokens: int) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a stream; `result` gets "started" after the first event, then the finish reason or an error."""
    result: dict[str, Any] = {"started": threading.Event(), "finish_reason": None, "error": None}
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }

    def run() -> None:
        try:
            with server.http().stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    result["started"].set()
                    if '"finish_reason":"length"' in line.replace(" ", ""):
                        result["finish_reason"] = "length"
        except httpx.HTTPError as error:
            result["error"] = error
        finally:
            result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_drains_in_flight_stream_and_exits_zero(server_launcher: Launcher) -> None:
    with server_launcher("--max-model-len", "512", "--shutdown-grace-seconds", "60") as server:
        thread, result = stream_in_background(server, max_tokens=40)
        assert result["started"].wait(60)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.base_url}/health", timeout=2)
        thread.join(60)
        assert result["error"] is None and result["finish_reason"] == "length"
        assert server.process.wait(60) == 0


def post_in_background(server: RunningServer, body: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """A non-streaming chat request; `result` gets its response (or the error)."""
    result: dict[str, Any] = {"response": None, "error": None}

    def run() -> None:
        try:
            result["response"] = server.http().post("/v1/chat/completions", json=body)
        except httpx.HTTPError as error:
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_refuses_new_requests_and_finishes_every_kind_in_flight(server_launcher: Launcher) -> None:
    grace_s = 120
    flags = ("--threads", "1", "--max-model-len", "512", "--shutdown-grace-seconds", str(grace_s))
    with server_launcher(*flags) as server:
        streams = [stream_in_background(server, max_tokens=100) for _ in range(2)]
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100, "ignore_eos": True}
        posts = [post_in_background(server, body) for _ in range(2)]
        for _, result in streams:
            assert result["started"].wait(120)
        deadline = time.monotonic() + 60  # all four are in the engine before the signal
        while server.metric("vllm:num_requests_running") + server.metric("vllm:num_requests_waiting") < 4:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=5)
        assert server.process.wait(grace_s) == 0
        assert time.monotonic() - signalled < grace_s
        for thread, _ in streams + posts:
            thread.join(10)
        for _, result in streams:
            assert result["error"] is None and result["finish_reason"] == "length"
        for _, result in posts:
            assert result["error"] is None and result["response"].status_code == 200
            assert result["response"].json()["usage"]["completion_tokens"] == 100


def test_sigterm_past_the_grace_period_cuts_requests_and_exits_zero(server_launcher: Launcher) -> None:
    with server_launcher("--max-model-len", "1024", "--shutdown-grace-seconds", "1") as server:
        thread, result = stream_in_background(server, max_tokens=900)
        assert result["started"].wait(60)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        assert time.monotonic() - start < 30
        thread.join(10)
        assert result["finish_reason"] is None
