"""`fusedserve chat`: an interactive terminal chat with any OpenAI-compatible server, through the official openai SDK.

Replies stream as they are generated; the conversation is kept as multi-turn history. Commands: /reset clears the
history (the --system prompt stays), /stats shows the last turn's tokens in and out, tokens/s and time to first token,
/help lists commands, /quit (or end of input) exits.

`ChatSession` owns the history and the per-turn measurements and never touches the terminal; `chat_loop` owns the
terminal and never builds requests. A turn enters the history only when its reply streamed to the end, so an error or
Ctrl-C mid-reply leaves the conversation as it was. Token counts come from the server's usage chunk
(`stream_options.include_usage`); a server that sends none gets its output counted in content chunks, and /stats says
so. This module must never import openai at import time (the `fusedserve` CLI stays fast): the handler does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
BASE_URL_ENV = "FUSEDSERVE_BASE_URL"
USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "
HELP_TEXT = "commands: /reset (clear history), /stats (last turn), /help, /quit"

Message = dict[str, str]
Clock = Callable[[], float]


@dataclass
class ChatSettings:
    """What every request of a session carries besides the messages."""

    model: str
    system: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    def sampling_arguments(self) -> dict[str, float | int]:
        """Only the options the user set, so the server's defaults apply to the rest."""
        arguments: dict[str, float | int] = {}
        if self.temperature is not None:
            arguments["temperature"] = self.temperature
        if self.max_tokens is not None:
            arguments["max_tokens"] = self.max_tokens
        return arguments


@dataclass
class TurnStats:
    """Measurements of one completed turn; times are seconds from sending the request."""

    prompt_tokens: int | None
    completion_tokens: int
    seconds: float
    time_to_first_token: float | None
    usage_reported: bool
    finish_reason: str | None

    @property
    def tokens_per_s(self) -> float:
        """Output tokens over the whole turn, first-token wait included."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens after the first one, over the time after it arrived (None when there is no such span)."""
        if self.time_to_first_token is None or self.completion_tokens < 2:
            return None
        decode_seconds = self.seconds - self.time_to_first_token
        return (self.completion_tokens - 1) / decode_seconds if decode_seconds > 0 else None

    def describe(self) -> str:
        tokens_in = "?" if self.prompt_tokens is None else str(self.prompt_tokens)
        counted = "" if self.usage_reported else " (counted in chunks: the server sent no usage)"
        ttft = "-" if self.time_to_first_token is None else f"{self.time_to_first_token:.3f} s"
        decode = self.decode_tokens_per_s
        decode_text = "-" if decode is None else f"{decode:.1f}"
        return (
            f"tokens in: {tokens_in}, tokens out: {self.completion_tokens}{counted}\n"
            f"tokens/s: {self.tokens_per_s:.1f} (decode only: {decode_text})\n"
            f"time to first token: {ttft}, total: {self.seconds:.3f} s, finish reason: {self.finish_reason or '-'}"
        )


@dataclass
class TurnRecorder:
    """Collects one streamed reply: its text, when content first arrived, the usage chunk and the finish reason."""

    started: float
    parts: list[str] = field(default_factory=list)
    first_content_at: float | None = None
    content_chunks: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None

    def observe(self, chunk: Any, now: float) -> str:
        """Record one ChatCompletionChunk; return its new text ('' when it carries none)."""
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens
        text = ""
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason
            if choice.delta.content:
                text += choice.delta.content
        if text:
            if self.first_content_at is None:
                self.first_content_at = now
            self.content_chunks += 1
            self.parts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def finish(self, now: float) -> TurnStats:
        reported = self.completion_tokens is not None
        return TurnStats(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens if reported else self.content_chunks,
            seconds=now - self.started,
            time_to_first_token=None if self.first_content_at is None else self.first_content_at - self.started,
            usage_reported=reported,
            finish_reason=self.finish_reason,
        )


class ChatSession:
    """A conversation with one model: its history and the last turn's stats. Knows nothing about terminals.

    `client` is an `openai.OpenAI` (anything with `.chat.completions.create(...)` returning an iterable of
    ChatCompletionChunk when `stream=True`).
    """

    def __init__(self, client: Any, settings: ChatSettings, clock: Clock = time.perf_counter) -> None:
        self.client = client
        self.settings = settings
        self.clock = clock
        self.history: list[Message] = []
        self.last_stats: TurnStats | None = None

    def reset(self) -> None:
        """Forget every turn (the system prompt is a setting, not history, so it stays)."""
        self.history.clear()

    def request_messages(self, user_text: str) -> list[Message]:
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def send(self, user_text: str) -> Iterator[str]:
        """Stream the reply to `user_text` as text deltas. The turn joins the history only once the stream ends."""
        user_message = {"role": "user", "content": user_text}
        started = self.clock()
        stream = self.client.chat.completions.create(
            model=self.settings.model,
            messages=self.request_messages(user_text),
            stream=True,
            stream_options={"include_usage": True},
            **self.settings.sampling_arguments(),
        )
        recorder = TurnRecorder(started)
        try:
            for chunk in stream:
                text = recorder.observe(chunk, self.clock())
                if text:
                    yield text
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self.last_stats = recorder.finish(self.clock())
        self.history += [user_message, {"role": "assistant", "content": recorder.text}]

    def describe_stats(self) -> str:
        if self.last_stats is None:
            return "no turn yet"
        return f"{self.last_stats.describe()}\nmessages in history: {len(self.history)}"


def chat_loop(
    session: ChatSession,
    read_line: Callable[[str], str] = input,
    out: TextIO | None = None,
    turn_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Read lines until /quit or end of input; stream each reply to `out` as it arrives. Returns the exit code.

    Errors of the kinds in `turn_errors` (the SDK's API errors) end only the turn, not the chat; Ctrl-C during a
    reply abandons that reply, at the prompt it quits.
    """
    out = out or sys.stdout
    print(f"chatting with {session.settings.model}; {HELP_TEXT}", file=out, flush=True)
    while True:
        try:
            line = read_line(USER_PROMPT).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/quit", "/exit"):
                return 0
            if command == "/reset":
                session.reset()
                print("history cleared", file=out, flush=True)
            elif command == "/stats":
                print(session.describe_stats(), file=out, flush=True)
            elif command == "/help":
                print(HELP_TEXT, file=out, flush=True)
            else:
                print(f"unknown command {command}; {HELP_TEXT}", file=out, flush=True)
            continue
        stream_reply(session, line, out, turn_errors)


def stream_reply(session: ChatSession, line: str, out: TextIO, turn_errors: tuple[type[BaseException], ...]) -> None:
    """One turn on the terminal: the reply's deltas as they arrive, or why it stopped short."""
    print(ASSISTANT_PREFIX, end="", file=out, flush=True)
    try:
        for text in session.send(line):
            print(text, end="", file=out, flush=True)
        print(file=out, flush=True)
    except KeyboardInterrupt:
        print("\n[reply interrupted; not added to the history]", file=out, flush=True)
    except turn_errors as error:
        print(f"\n[error: {error}]", file=out, flush=True)


def first_model_id(client: Any) -> str:
    """The first id /v1/models lists."""
    for model in client.models.list():
        return model.id
    raise LookupError("the server lists no models")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="chat with a running OpenAI-compatible server in the terminal")
    add_chat_arguments(parser)
    parser.set_defaults(handler=run_chat)


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-url",
        default=os.environ.get(BASE_URL_ENV, DEFAULT_BASE_URL),
        help=f"the server's /v1 URL (default: ${BASE_URL_ENV} or {DEFAULT_BASE_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        help="bearer key (default: $OPENAI_API_KEY or EMPTY)",
    )
    parser.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    parser.add_argument("--system", default=None, help="system prompt, kept across /reset")
    parser.add_argument("--temperature", type=float, default=None, help="default: the server's")
    parser.add_argument("--max-tokens", type=int, default=None, help="per reply (default: the server's)")


def run_chat(args: argparse.Namespace) -> int:
    import openai

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - importing it gives input() line editing and history

    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or first_model_id(client)
    except (openai.APIError, LookupError) as error:
        print(f"fusedserve chat: cannot list models at {args.base_url}: {error}", file=sys.stderr)
        return 1
    settings = ChatSettings(model, args.system, args.temperature, args.max_tokens)
    return chat_loop(ChatSession(client, settings), turn_errors=(openai.APIError,))
