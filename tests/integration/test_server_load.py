"""Load and departures on a real server: 32 concurrent streams, clients that vanish, a full waiting queue.

The "tight" server has one KV slot (--max-num-seqs 1) and room for two waiting requests (--max-waiting 2), so a
request holding the slot is visible from outside: the next request cannot finish until the slot is free.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon."}]
LONG = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}
# A freed slot serves a short request in well under this; a held one needs the 900-token request to end first.
FREED_WITHIN_S = 20.0


@pytest.fixture(scope="module")
def tight_server(server_launcher: Launcher) -> Iterator[RunningServer]:
    flags = ("--max-model-len", "1024", "--max-num-seqs", "1", "--max-waiting", "2", "--disable-access-log")
    with server_launcher(*flags) as server:
        yield server


def open_raw_request(server: RunningServer, body: dict[str, object]) -> socket.socket:
    """Send a chat request over a bare socket and leave it unread; closing the socket is a disconnect."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def short_request_seconds(server: RunningServer) -> float:
    start = time.monotonic()
    response = server.http(timeout=120).post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 3}
    )
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def wait_for_idle_engine(server: RunningServer, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.metric("vllm:num_requests_running") == 0 and server.metric("vllm:num_requests_waiting") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("requests still running or waiting after their clients left")


def test_disconnected_stream_frees_its_slot(tight_server: RunningServer) -> None:
    with tight_server.http().stream(
        "POST", "/v1/chat/completions", json={**LONG, "stream": True}
    ) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the request is running and holds the only slot
    wait_for_idle_engine(tight_server, FREED_WITHIN_S)
    assert short_request_seconds(tight_server) < FREED_WITHIN_S


def test_disconnected_non_stream_request_frees_its_slot(tight_server: RunningServer) -> None:
    with pytest.raises(httpx.ReadTimeout):
        tight_server.http(timeout=2.0).post("/v1/chat/completions", json=LONG)
    wait_for_idle_engine(tight_server, FREED_WITHIN_S)
    assert short_request_seconds(tight_server) < FREED_WITHIN_S


def test_client_gone_before_first_token_frees_its_slot(tight_server: RunningServer) -> None:
    sock = open_raw_request(tight_server, {**LONG, "stream": True})
    time.sleep(0.5)
    sock.close()
    wait_for_idle_engine(tight_server, FREED_WITHIN_S)
    assert short_request_seconds(tight_server) < FREED_WITHIN_S


def test_full_waiting_queue_is_429_with_retry_after(tight_server: RunningServer) -> None:
    sockets = [open_raw_request(tight_server, {**LONG, "stream": True})]  # takes the slot
    time.sleep(1.0)
    sockets += [open_raw_request(tight_server, {**LONG, "stream": True}) for _ in range(2)]  # fill the queue
    time.sleep(1.0)
    try:
        assert tight_server.metric("vllm:num_requests_waiting") == 2
        response = tight_server.http().post("/v1/chat/completions", json=LONG)
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "engine_overloaded"
    finally:
        for sock in sockets:
            sock.close()
    wait_for_idle_engine(tight_server)
    assert short_request_seconds(tight_server) < FREED_WITHIN_S


async def _one_stream(server: RunningServer, index: int) -> tuple[str, str | None, int]:
    client = server.async_openai()
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": f"Count from {index} upwards."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    role, text, finish, usage_tokens = None, "", None, 0
    async for chunk in stream:
        if chunk.usage is not None:
            usage_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            role = role or choice.delta.role
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    await client.close()
    assert role == "assistant"
    return text, finish, usage_tokens


def test_32_concurrent_streams_all_finish(default_server: RunningServer) -> None:
    async def run_all() -> list[tuple[str, str | None, int]]:
        return await asyncio.gather(*(_one_stream(default_server, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert len(results) == 32
    for text, finish, usage_tokens in results:
        assert text and finish == "length" and usage_tokens == 16
