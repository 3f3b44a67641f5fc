"""Shared test fixtures: start `fusedserve serve` as a real subprocess on a free loopback port; run a block at a
given torch thread count (`torch_threads`).

`launch_server(*flags)` is a context manager that starts the server, waits for /health, yields a
`RunningServer`, and on exit sends SIGTERM and waits for the process (killing it only if it hangs). The
session-scoped `default_server` serves the real default model (SmolLM2-135M-Instruct) for every integration
test that needs no special flags; its log is printed when startup fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 300.0
# Small limits keep the real model quick on a shared 2-core machine.
DEFAULT_SERVER_FLAGS = ("--max-model-len", "1024", "--max-num-seqs", "32", "--disable-access-log")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def http(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers(), timeout=timeout)

    def openai(self, strict: bool = True, **kwargs: object):  # noqa: ANN201 - openai.OpenAI
        import openai

        return openai.OpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=120.0,
            _strict_response_validation=strict,
            **kwargs,
        )

    def async_openai(self, strict: bool = True, **kwargs: object):  # noqa: ANN201 - openai.AsyncOpenAI
        import openai

        return openai.AsyncOpenAI(
            base_url=f"{self.base_url}/v1",
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=120.0,
            _strict_response_validation=strict,
            **kwargs,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus series' samples over its labels, read from /metrics."""
        text = self.http().get("/metrics").text
        total, found = 0.0, False
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
                found = True
        if not found:
            raise KeyError(f"{name} is not in /metrics")
        return total


def _wait_until_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"fusedserve exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"fusedserve was not healthy after {timeout:.0f} s:\n{server.log()[-4000:]}")


def _warm_up(server: RunningServer) -> None:
    """One tiny request, so one-time work on the first request (kernel builds, allocations) is not timed by tests."""
    response = server.http(timeout=STARTUP_TIMEOUT_S).post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    response.raise_for_status()


def stop_server(server: RunningServer, timeout: float = 60.0) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


Launcher = Callable[..., contextlib.AbstractContextManager[RunningServer]]


@contextlib.contextmanager
def launch_server(
    *flags: str, api_key: str | None = None, env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix=f"fusedserve-{port}-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "fusedserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*command, *flags],
        cwd=REPO_ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = RunningServer(process, port, Path(log_file.name), api_key)
    try:
        _wait_until_healthy(server, STARTUP_TIMEOUT_S)
        _warm_up(server)
        yield server
    finally:
        stop_server(server)
        log_file.close()


@pytest.fixture(scope="session")
def default_server() -> Iterator[RunningServer]:
    """One real server on the default model, shared by every test that needs no special flags."""
    with launch_server(*DEFAULT_SERVER_FLAGS) as server:
        yield server


@pytest.fixture(scope="session")
def server_launcher() -> Launcher:
    """`launch_server` for tests that need a server with their own flags."""
    return launch_server


@pytest.fixture
def torch_threads() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """`with torch_threads(n):` runs the block at n torch threads and restores the previous count after."""
    import torch

    @contextlib.contextmanager
    def at(threads: int) -> Iterator[None]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    return at
