"""--request-timeout frees the engine: a request past its time limit is aborted there, not only answered 408.

The server has one KV slot (--max-num-seqs 1), so a timed-out request that kept generating would hold it for
minutes: the short request after it could not finish within its own time limit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
TIMEOUT_S = 6
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
LONG = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def one_slot_server(server_launcher: Launcher) -> Iterator[RunningServer]:
    flags = (
        "--threads", "1", "--max-model-len", "1024", "--max-num-seqs", "1", "--request-timeout", str(TIMEOUT_S),
        "--disable-access-log",
    )  # fmt: skip
    with server_launcher(*flags) as server:
        yield server


def assert_slot_free_at_once(server: RunningServer) -> None:
    assert server.metric("vllm:num_requests_running") == 0
    assert server.metric("fusedserve:kv_cache_slots_in_use") == 0
    response = server.http().post("/v1/chat/completions", json=SHORT)
    assert response.status_code == 200, response.text


def test_timed_out_request_is_aborted_in_the_engine(one_slot_server: RunningServer) -> None:
    started = time.monotonic()
    response = one_slot_server.http().post("/v1/chat/completions", json=LONG)
    assert response.status_code == 408 and response.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < TIMEOUT_S + 5
    time.sleep(1.0)  # the abort crosses into the engine thread and one step publishes the gauges
    assert_slot_free_at_once(one_slot_server)


def test_timed_out_stream_is_aborted_in_the_engine(one_slot_server: RunningServer) -> None:
    with one_slot_server.http().stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert '"request_timeout"' in events[-2] and events[-1] == "data: [DONE]"
    time.sleep(1.0)
    assert_slot_free_at_once(one_slot_server)
