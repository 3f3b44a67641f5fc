"""The clients against a real `fusedserve serve` (default model): `fusedserve chat` driven in a pseudo-terminal the
way a person types, and every script in fusedserve/clients/examples/ run as a user would run it.

The machine is small and shared, so the server runs with one torch thread, replies are capped at 16 tokens, and every
wait is generous.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "fusedserve" / "clients" / "examples"
SERVER_FLAGS = ("--max-model-len", "2048", "--threads", "1", "--disable-access-log")
MAX_TOKENS = "16"
REPLY_TIMEOUT_S = 300.0
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
STATS = re.compile(
    r"tokens in: (?P<tokens_in>\d+), tokens out: (?P<tokens_out>\d+)\n"
    r"tokens/s: (?P<tokens_per_s>[\d.]+) .*\n"
    r"time to first token: (?P<ttft>[\d.]+) s, total: (?P<total>[\d.]+) s.*\n"
    r"messages in history: (?P<messages>\d+)\n"
)


@pytest.fixture(scope="module")
def client_server(server_launcher: Launcher) -> Iterator[RunningServer]:
    with server_launcher(*SERVER_FLAGS) as server:
        yield server


@dataclass
class PtyProcess:
    """A child process whose stdin, stdout and stderr are one pseudo-terminal; its output read as a person sees it."""

    process: subprocess.Popen[bytes]
    master: int
    output: str = ""
    consumed: int = 0
    reads: list[tuple[int, int]] = field(default_factory=list)  # (start, end) offsets in `output` of each read

    @classmethod
    def spawn(cls, command: list[str], env: dict[str, str]) -> PtyProcess:
        master, slave = pty.openpty()
        process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, cwd=REPO_ROOT, env=env, start_new_session=True
        )
        os.close(slave)
        return cls(process, master)

    def read_some(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        text = ANSI_ESCAPE.sub("", data.decode(errors="replace").replace("\r", ""))
        self.reads.append((len(self.output), len(self.output) + len(text)))
        self.output += text
        return True

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait for `pattern` in output not yet consumed; consume up to the end of the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output, self.consumed)
            if match:
                self.consumed = match.end()
                return match
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.read_some(min(remaining, 1.0)):
                raise AssertionError(f"no {regex.pattern!r} within {timeout:.0f} s; output:\n{self.output[-3000:]}")

    def send_line(self, text: str) -> None:
        os.write(self.master, (text + "\r").encode())

    def reads_within(self, start: int, end: int) -> int:
        return sum(1 for read_start, read_end in self.reads if read_start < end and read_end > start)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@pytest.fixture
def chat_terminal(client_server: RunningServer) -> Iterator[PtyProcess]:
    command = [sys.executable, "-m", "fusedserve.cli", "chat", "--base-url", f"{client_server.base_url}/v1"]
    command += ["--max-tokens", MAX_TOKENS, "--temperature", "0"]
    terminal = PtyProcess.spawn(command, env={**os.environ, "TERM": "dumb"})
    try:
        yield terminal
    finally:
        terminal.close()


def ask(terminal: PtyProcess, message: str) -> re.Match[str]:
    """Type a message; return the match of the streamed reply (group 1) that ends at the next prompt."""
    terminal.send_line(message)
    terminal.expect(re.escape(message) + "\n", 60.0)
    return terminal.expect(re.compile(r"assistant> (.*?)\nyou> ", re.DOTALL), REPLY_TIMEOUT_S)


def stats(terminal: PtyProcess) -> dict[str, float]:
    terminal.send_line("/stats")
    match = terminal.expect(STATS, 60.0)
    terminal.expect("you> ", 60.0)
    return {name: float(value) for name, value in match.groupdict().items()}


def test_chat_streams_replies_keeps_history_and_reports_stats_in_a_terminal(chat_terminal: PtyProcess) -> None:
    terminal = chat_terminal
    model = terminal.expect(r"chatting with (\S+);", 120.0).group(1)
    assert model == "SmolLM2-135M-Instruct"
    terminal.expect("you> ", 60.0)

    first = ask(terminal, "Name three colours.")
    assert first.group(1).strip()
    # Streamed: the reply reached the terminal in several pieces, not in one write at the end.
    assert terminal.reads_within(first.start(1), first.end(1)) >= 2

    first_stats = stats(terminal)
    assert first_stats["tokens_in"] > 0 and 1 <= first_stats["tokens_out"] <= int(MAX_TOKENS)
    assert first_stats["tokens_per_s"] > 0
    assert 0 < first_stats["ttft"] <= first_stats["total"]
    assert first_stats["messages"] == 2

    second = ask(terminal, "Name three more.")
    assert second.group(1).strip()
    second_stats = stats(terminal)
    # The second request carried the first turn, so its prompt is longer than the first turn's prompt and reply.
    assert second_stats["tokens_in"] > first_stats["tokens_in"] + first_stats["tokens_out"]
    assert second_stats["messages"] == 4

    terminal.send_line("/reset")
    terminal.expect("history cleared\n", 60.0)
    terminal.expect("you> ", 60.0)
    assert stats(terminal)["messages"] == 0

    terminal.send_line("/quit")
    assert terminal.process.wait(timeout=60) == 0


def test_chat_exits_zero_at_end_of_input(chat_terminal: PtyProcess) -> None:
    chat_terminal.expect("you> ", 120.0)
    os.write(chat_terminal.master, b"\x04")  # Ctrl-D on an empty line: end of input
    assert chat_terminal.process.wait(timeout=60) == 0


def run_example(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--max-tokens", MAX_TOKENS, *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=REPLY_TIMEOUT_S,
    )


@pytest.mark.parametrize("script", ["chat.py", "streaming.py", "completions.py"])
def test_example_script_prints_a_reply_and_exits_zero(client_server: RunningServer, script: str) -> None:
    result = run_example(script, env={"FUSEDSERVE_BASE_URL": f"{client_server.base_url}/v1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) >= 2 and lines[0].strip()
    assert lines[-1].startswith("[SmolLM2-135M-Instruct: ") and " out]" in lines[-1]


def test_example_takes_base_url_and_model_from_argv(client_server: RunningServer) -> None:
    unreachable = {"FUSEDSERVE_BASE_URL": "http://127.0.0.1:9/v1"}
    args = ("--base-url", f"{client_server.base_url}/v1", "--model", "SmolLM2-135M-Instruct")
    result = run_example("chat.py", *args, env=unreachable)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip()
