"""`fusedserve chat`'s ChatSession and terminal loop, fed streams of the openai SDK's own ChatCompletionChunk objects.

The fake client stands in for the network only: it records each request's arguments and returns a scripted
stream of real `openai.types.chat.ChatCompletionChunk`s, advancing a fake clock before each chunk so the timing
stats are exact.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletionChunk

from fusedserve.clients.chat import ChatSession, ChatSettings, chat_loop

MODEL = "tiny-model"


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> ChatCompletionChunk:
    delta = {"content": content, **({"role": role} if role else {})}
    return ChatCompletionChunk(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        created=0,
        model=MODEL,
        choices=[{"index": 0, "delta": delta, "finish_reason": finish}],
    )


def usage_chunk(prompt_tokens: int, completion_tokens: int) -> ChatCompletionChunk:
    """The include_usage chunk: usage and no choices."""
    return ChatCompletionChunk(
        id="chatcmpl-1",
        object="chat.completion.chunk",
        created=0,
        model=MODEL,
        choices=[],
        usage=CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
    )


def reply(*pieces: str, prompt_tokens: int = 7, completion_tokens: int | None = None) -> list[ChatCompletionChunk]:
    """A whole streamed reply as a server sends it: role chunk, content chunks, finish chunk, usage chunk."""
    chunks = [chunk("", role="assistant"), *(chunk(piece) for piece in pieces), chunk(None, finish="stop")]
    count = len(pieces) if completion_tokens is None else completion_tokens
    return [*chunks, usage_chunk(prompt_tokens, count)]


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeStream:
    """Yields its chunks, each `step` seconds after the last; optionally fails after `fail_after` chunks."""

    chunks: list[ChatCompletionChunk]
    clock: FakeClock
    step: float = 0.5
    fail_after: int | None = None
    closed: bool = False

    def __iter__(self) -> Iterator[ChatCompletionChunk]:
        for index, item in enumerate(self.chunks):
            if index == self.fail_after:
                raise ConnectionError("server went away")
            self.clock.now += self.step
            yield item

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeClient:
    """`client.chat.completions.create(**kwargs)` returning the next scripted stream."""

    streams: list[FakeStream]
    requests: list[dict] = field(default_factory=list)

    @property
    def chat(self) -> FakeClient:
        return self

    @property
    def completions(self) -> FakeClient:
        return self

    def create(self, **kwargs: object) -> FakeStream:
        self.requests.append(copy.deepcopy(kwargs))
        return self.streams.pop(0)


def make_session(
    *replies: list[ChatCompletionChunk], settings: ChatSettings | None = None, **stream_options: object
) -> tuple[ChatSession, FakeClient]:
    clock = FakeClock()
    client = FakeClient([FakeStream(chunks, clock, **stream_options) for chunks in replies])
    return ChatSession(client, settings or ChatSettings(MODEL), clock=clock), client


def test_reply_is_yielded_delta_by_delta() -> None:
    session, _ = make_session(reply("Red", ", green", " and blue."))
    assert list(session.send("Name three colours.")) == ["Red", ", green", " and blue."]


def test_request_streams_with_usage_and_only_the_sampling_options_set() -> None:
    session, client = make_session(reply("Hi"), settings=ChatSettings(MODEL, max_tokens=16))
    list(session.send("Hello"))
    request = client.requests[0]
    assert request["model"] == MODEL and request["stream"] is True
    assert request["stream_options"] == {"include_usage": True}
    assert request["max_tokens"] == 16 and "temperature" not in request


def test_second_turn_carries_the_first_as_history() -> None:
    session, client = make_session(reply("Paris."), reply("About 2 million."))
    list(session.send("Capital of France?"))
    list(session.send("Its population?"))
    assert client.requests[1]["messages"] == [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "Its population?"},
    ]


def test_reset_clears_history_but_keeps_the_system_prompt() -> None:
    settings = ChatSettings(MODEL, system="Be brief.", temperature=0.0)
    session, client = make_session(reply("Hi."), reply("Hello again."), settings=settings)
    list(session.send("Hello"))
    session.reset()
    assert session.history == []
    list(session.send("Hello?"))
    assert client.requests[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello?"},
    ]
    assert client.requests[1]["temperature"] == 0.0


def test_stats_take_token_counts_from_the_usage_chunk_and_time_from_first_content() -> None:
    # Chunks arrive every 0.5 s: role (0.5), "A" (1.0), "B" (1.5), "C" (2.0), finish (2.5), usage (3.0).
    session, _ = make_session(reply("A", "B", "C", prompt_tokens=11, completion_tokens=4))
    list(session.send("Go"))
    stats = session.last_stats
    assert stats is not None and stats.usage_reported
    assert (stats.prompt_tokens, stats.completion_tokens) == (11, 4)
    assert stats.time_to_first_token == pytest.approx(1.0)
    assert stats.seconds == pytest.approx(3.0)
    assert stats.tokens_per_s == pytest.approx(4 / 3.0)
    assert stats.decode_tokens_per_s == pytest.approx(3 / 2.0)
    assert stats.finish_reason == "stop"


def test_stats_count_content_chunks_when_the_server_sends_no_usage() -> None:
    session, _ = make_session(reply("A", "B")[:-1])
    list(session.send("Go"))
    stats = session.last_stats
    assert stats is not None and not stats.usage_reported
    assert stats.prompt_tokens is None and stats.completion_tokens == 2
    assert "counted in chunks" in session.describe_stats()


def test_stats_describe_every_number_of_the_last_turn() -> None:
    session, _ = make_session(reply("A", "B", "C", prompt_tokens=11, completion_tokens=4))
    assert session.describe_stats() == "no turn yet"
    list(session.send("Go"))
    text = session.describe_stats()
    assert "tokens in: 11, tokens out: 4" in text
    assert "tokens/s: 1.3 (decode only: 1.5)" in text
    assert "time to first token: 1.000 s, total: 3.000 s" in text


def test_abandoned_reply_leaves_history_and_stats_unchanged_and_closes_the_stream() -> None:
    session, client = make_session(reply("A", "B", "C"))
    stream = client.streams[0]
    deltas = session.send("Go")
    assert next(deltas) == "A"
    deltas.close()
    assert session.history == [] and session.last_stats is None
    assert stream.closed


def test_failed_stream_leaves_history_unchanged() -> None:
    session, _ = make_session(reply("A", "B"), fail_after=2)
    with pytest.raises(ConnectionError):
        list(session.send("Go"))
    assert session.history == [] and session.last_stats is None


def scripted_input(lines: list[str]):  # noqa: ANN201 - a read_line callable
    pending = list(lines)

    def read_line(prompt: str) -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read_line


def test_loop_streams_replies_and_runs_commands() -> None:
    session, client = make_session(reply("Hello", " there."))
    out = io.StringIO()
    code = chat_loop(session, scripted_input(["Hi", "/stats", "/reset", "/stats", "/quit", "never read"]), out)
    text = out.getvalue()
    assert code == 0
    assert "assistant> Hello there.\n" in text
    assert "tokens in: 7, tokens out: 2" in text
    assert "history cleared" in text and "messages in history: 0" in text
    assert len(client.requests) == 1


def test_loop_exits_cleanly_at_end_of_input() -> None:
    session, _ = make_session()
    assert chat_loop(session, scripted_input([]), io.StringIO()) == 0


def test_loop_reports_a_turn_error_and_keeps_chatting() -> None:
    session, client = make_session(reply("A"), reply("Fine."), fail_after=1)
    client.streams[1].fail_after = None
    out = io.StringIO()
    code = chat_loop(session, scripted_input(["first", "second"]), out, turn_errors=(ConnectionError,))
    assert code == 0
    assert "[error: server went away]" in out.getvalue()
    assert "assistant> Fine.\n" in out.getvalue()
    assert session.history[0] == {"role": "user", "content": "second"}


def test_loop_rejects_unknown_commands_without_sending() -> None:
    session, client = make_session()
    out = io.StringIO()
    chat_loop(session, scripted_input(["/bogus"]), out)
    assert "unknown command /bogus" in out.getvalue() and client.requests == []
