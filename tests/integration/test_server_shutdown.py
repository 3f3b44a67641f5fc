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
