"""The asyncio front of the engine: one engine thread runs step() in a loop; coroutines stream results.

Requests and aborts cross into the engine thread through a queue; each step's outputs come back to the event
loop with call_soon_threadsafe. Detokenization and stop strings are handled here, per request, on the event-loop
side (as vLLM v1's output processor does): when a stop string matches, the request is aborted in the engine at
once. Closing a `generate` iterator early (client gone, task cancelled) aborts the request, which frees its KV
slot in the engine's next loop iteration.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fusedserve.engine.config import EngineConfig
from fusedserve.engine.detokenizer import IncrementalDetokenizer
from fusedserve.engine.errors import EngineDeadError, EngineError, EngineOverloadedError, PromptTooLongError
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.manifest import read_manifest
from fusedserve.engine.observer import EngineObserver
from fusedserve.engine.request import RequestOutput, TokenLogprobs
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.stop_checker import StopStringChecker
from fusedserve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationChunk:
    """What one request gained since its previous chunk: text (stop strings removed) and tokens."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    stop_reason: int | str | None = None
    error: str | None = None


@dataclass
class _Stream:
    """The event-loop side of one request: its inbox and its text state."""

    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    stop_checker: StopStringChecker
    outputs: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Owns the engine thread. The engine is built on that thread, not handed in: see `_run_engine`."""

    def __init__(
        self, build_engine: Callable[[], LLMEngine], model_name: str, manifest: dict[str, Any] | None = None
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest or {}
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._dead_reason: str | None = None
        self._ids = itertools.count()
        self._stats: dict[str, Any] = {"num_running": 0, "num_waiting": 0}
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.engine: LLMEngine  # set on the engine thread, before _built
        self._thread = threading.Thread(
            target=self._run_engine, args=(build_engine,), name="fusedserve-engine", daemon=True
        )
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error
        self.tokenizer: Tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig, observer: EngineObserver | None = None) -> AsyncEngine:
        return cls(
            lambda: LLMEngine.from_config(config, observer),
            config.model.served_model_name,
            read_manifest(config.model.model_dir),
        )

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def healthy(self) -> bool:
        return self._dead_reason is None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    # -- the public coroutine ------------------------------------------------------------------------------
    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """Stream a request's output. Raises PromptTooLongError / EngineOverloadedError / EngineDeadError first."""
        self._check_admissible(prompt_token_ids)
        self._loop = asyncio.get_running_loop()
        request_id = request_id or f"req-{next(self._ids)}"
        stream = _Stream(
            params=params,
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens),
            stop_checker=StopStringChecker(params.stop, params.include_stop_str_in_output),
        )
        self._streams[request_id] = stream
        self._inbox.put(("add", (request_id, prompt_token_ids, params)))
        finished = False
        try:
            while not finished:
                output = await stream.outputs.get()
                if isinstance(output, BaseException):
                    raise output
                chunk = self._to_chunk(request_id, stream, output)
                finished = chunk.finished
                yield chunk
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        self._thread.join(timeout)
        self.engine.kv_cache.close()

    def _check_admissible(self, prompt_token_ids: list[int]) -> None:
        if not self.healthy:
            raise EngineDeadError(f"the engine is not running: {self._dead_reason or 'stopped'}")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens",
                param="input_tokens",
            )
        limit = self.engine.config.scheduler.max_waiting
        # Requests not yet running = open streams minus running ones (queued adds included; aborts are not).
        if limit is not None and len(self._streams) - self._stats["num_running"] >= limit:
            raise EngineOverloadedError(f"the server is busy: {limit} requests are already waiting")

    # -- event-loop side: tokens to text ------------------------------------------------------------------
    def _to_chunk(self, request_id: str, stream: _Stream, output: RequestOutput) -> GenerationChunk:
        text = stream.detokenizer.push(output.new_token_ids)
        if output.finished:
            text += stream.detokenizer.flush()
        check = stream.stop_checker.push(text)
        text, finished, reason = check.text, output.finished, output.finish_reason
        stop_reason = output.stop_reason
        if check.stopped and not output.finished:
            self._inbox.put(("stop", (request_id, check.stop_str)))
            finished, reason, stop_reason = True, "stop", check.stop_str
        elif check.stopped:
            reason, stop_reason = "stop", check.stop_str
        elif output.finished:
            text += stream.stop_checker.flush()
        return GenerationChunk(
            text=text,
            token_ids=output.new_token_ids,
            logprobs=output.new_logprobs,
            finished=finished,
            finish_reason=reason,
            num_prompt_tokens=output.num_prompt_tokens,
            num_output_tokens=output.num_output_tokens,
            stop_reason=stop_reason,
            error=output.error,
        )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.outputs.put_nowait(output)

    def _fail_all(self, error: BaseException) -> None:
        for stream in list(self._streams.values()):
            stream.outputs.put_nowait(error)

    # -- engine thread ------------------------------------------------------------------------------------------
    def _run_engine(self, build_engine: Callable[[], LLMEngine]) -> None:
        # Built here so that this is the only thread that ever runs torch's OpenMP parallel regions. libgomp keeps
        # a worker team per thread that has run one; once two teams exist on a 2-core machine their workers stop
        # spin-waiting and every parallel op pays a futex wake-up (measured: a batch-1 linear 70 -> 175 us, decode
        # 28 -> 19 tok/s). It also makes torch.set_num_threads, a per-thread OpenMP setting, apply to this thread.
        try:
            self.engine = build_engine()
        except BaseException as error:
            self._build_error = error
            return
        finally:
            self._built.set()
        engine = self.engine
        try:
            while not self._stopping.is_set():
                self._drain_inbox(block=not engine.has_work)
                if engine.has_work:
                    outputs = engine.step()
                    self._publish(outputs)
        except BaseException as error:  # the engine thread must never die silently
            log.exception("the engine thread died")
            self._dead_reason = f"{type(error).__name__}: {error}"
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._fail_all, EngineDeadError(self._dead_reason))

    def _drain_inbox(self, block: bool) -> None:
        try:
            command, payload = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "add":
                request_id, prompt_token_ids, params = payload
                try:
                    self.engine.add_request(request_id, prompt_token_ids, params)
                except EngineError as error:  # a bad request must not take the engine thread down
                    self._send_error(request_id, error)
            elif command == "abort":
                self.engine.abort_request(payload)
            elif command == "stop":
                self.engine.stop_request(*payload)
            try:
                command, payload = self._inbox.get_nowait()
            except queue.Empty:
                break
        self._publish([])

    def _send_error(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(stream.outputs.put_nowait, error)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        scheduler = self.engine.scheduler
        self._stats = {"num_running": len(scheduler.running), "num_waiting": len(scheduler.waiting)}
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)
