"""The synchronous engine: add requests, call step() in a loop, get each request's new tokens back.

One step = schedule -> run the model -> sample -> apply stop rules -> report. This class is driven by exactly one
thread (AsyncEngine's engine thread, or a test/benchmark calling step() directly); it is not thread-safe.
Token-level stops (EOS, stop_token_ids, max_tokens, max_model_len) happen here; stop *strings* need text and are
checked by the caller's output processor, which aborts the request when one matches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from fusedserve.engine.config import EngineConfig
from fusedserve.engine.device import resolve_device, resolve_dtype
from fusedserve.engine.errors import PromptTooLongError
from fusedserve.engine.host_memory import keep_large_blocks_in_heap
from fusedserve.engine.kv_cache import KVCache, KVCacheSpec
from fusedserve.engine.manifest import read_manifest
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import dense_linear_factory, load_llama, mixed_precision_linear_factory
from fusedserve.engine.model_runner import ModelRunner
from fusedserve.engine.observer import EngineObserver, NullObserver, StepStats
from fusedserve.engine.request import Request, RequestOutput, RequestStatus
from fusedserve.engine.sampler import Sampler, SampleResult
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.scheduler import Scheduler, SchedulerOutput
from fusedserve.engine.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# --dtype choices: the weights' storage dtype and how linears compute.
#   auto      fp32 weights; batches of BF16_MIN_ROWS+ rows (1: all) run in bf16 on AMX (measured faster);
#             the KV cache is bf16
#   float32   fp32 everywhere (bit-for-bit comparable with transformers in fp32; outputs independent of batching)
#   bfloat16  bf16 weights and compute
# On CUDA, auto means bfloat16 (engine/device.py resolves it before loading).
DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}


def build_kv_cache(config: EngineConfig, model: LlamaModel) -> KVCache:
    from fusedserve.engine.vattention import create_kv_cache

    arch = model.arch
    spec = KVCacheSpec(
        num_layers=arch.num_layers,
        max_num_seqs=config.scheduler.max_num_seqs,
        max_model_len=config.scheduler.max_model_len,
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        dtype=model.kv_dtype,
    )
    return create_kv_cache(spec, config.cache, config.model.device)


def load_model_for_engine(
    model_dir: Path, dtype: str, max_positions: int, device: torch.device | str = "cpu"
) -> LlamaModel:
    """Load the model onto `device`, switching on the runtime side of each technique its manifest names."""
    make_dense = mixed_precision_linear_factory if dtype == "auto" else dense_linear_factory
    if "larosa" not in read_manifest(model_dir):
        return load_llama(model_dir, DTYPES[dtype], max_positions, make_linear=make_dense, device=device)
    from fusedserve.engine.larosa.dense_twin import attach_dense_twin
    from fusedserve.engine.larosa.runtime import larosa_linear_factory

    make_linear = larosa_linear_factory(model_dir, dense=make_dense) or make_dense
    model = load_llama(model_dir, DTYPES[dtype], max_positions, make_linear=make_linear, device=device)
    attach_dense_twin(model, make_dense)  # large steps skip the per-layer residual adapters
    return model


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaModel,
        tokenizer: Tokenizer,
        kv_cache: KVCache,
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.kv_cache = kv_cache
        self.scheduler = Scheduler(config.scheduler, kv_cache)
        self.runner = ModelRunner(model, kv_cache, Sampler(model.arch.vocab_size, tokenizer.eos_token_ids))
        self.observer: EngineObserver = observer or NullObserver()
        self.requests: dict[str, Request] = {}
        self._reported: dict[str, int] = {}  # request id -> output tokens already reported
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts, failures)

    @classmethod
    def from_config(cls, config: EngineConfig, observer: EngineObserver | None = None) -> LLMEngine:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = resolve_device(config.model.device)
        if device.type == "cpu":
            keep_large_blocks_in_heap()
        dtype = resolve_dtype(config.model.dtype, device)
        config = replace(config, model=replace(config.model, device=str(device), dtype=dtype))
        model_dir = Path(config.model.model_dir)
        model = load_model_for_engine(model_dir, dtype, config.scheduler.max_model_len, device)
        tokenizer = load_tokenizer(model_dir)
        return cls(config, model, tokenizer, build_kv_cache(config, model), observer)

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        if not prompt_token_ids:
            raise PromptTooLongError("the prompt is empty", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens, and at least one must be left for the output",
                param="input_tokens",
            )
        room = self.max_model_len - len(prompt_token_ids)
        max_output = room if params.max_tokens is None else min(params.max_tokens, room)
        request = Request(request_id, list(prompt_token_ids), params, len(prompt_token_ids) + max_output)
        self.requests[request_id] = request
        self._reported[request_id] = 0
        self.scheduler.add(request)
        return request

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self._pending.append(self._output_of(request))

    def stop_request(self, request_id: str, stop_reason: str) -> None:
        """End a request that the caller found complete (a stop string matched in its text)."""
        request = self.requests.get(request_id)
        if request is not None:
            request.stop_reason = stop_reason
            self._finish(request, RequestStatus.FINISHED_STOPPED)
            self._pending.append(self._output_of(request))

    def fail_request(self, request: Request, message: str) -> None:
        request.error = message
        self._finish(request, RequestStatus.FINISHED_ERROR)
        self._pending.append(self._output_of(request))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._pending)

    # -- the step --------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.monotonic()
        scheduled = self.scheduler.schedule()
        for request in scheduled.unservable:
            self.fail_request(request, "the request does not fit in the KV cache memory budget")
        stats = StepStats(
            step_seconds=0.0,
            num_scheduled_tokens=scheduled.num_tokens,
            num_prompt_tokens=0,
            num_generation_tokens=0,
            num_running=0,
            num_waiting=0,
            num_preemptions=len(scheduled.preempted),
            kv_usage=self.kv_cache.usage(0),
        )
        touched: list[Request] = []
        if scheduled.chunks:
            touched = self._run_scheduled(scheduled, stats)
        outputs = self._pending + [self._output_of(r) for r in touched if r.request_id in self.requests]
        self._pending = []
        self._forget_finished(outputs)
        if not self.scheduler.has_work:  # idle from here on: freed slots' KV pages go back to the OS now
            self.kv_cache.release_idle_memory()
        stats.step_seconds = time.monotonic() - started
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        before = stats.kv_usage
        stats.kv_usage = self.kv_cache.usage(self.scheduler.live_tokens())
        stats.pages_mapped = stats.kv_usage.pages_mapped_total - before.pages_mapped_total
        stats.pages_unmapped = stats.kv_usage.pages_unmapped_total - before.pages_unmapped_total
        self.observer.on_step(stats)
        return outputs

    def _run_scheduled(self, scheduled: SchedulerOutput, stats: StepStats) -> list[Request]:
        self.kv_cache.prepare_next_step(
            {c.request.slot: c.request.num_computed_tokens + c.num_tokens + 1 for c in scheduled.chunks}
        )
        sampling, logits = self.runner.run(scheduled)
        for chunk in scheduled.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            prompt_done = min(request.num_computed_tokens, request.num_prompt_tokens)
            stats.num_prompt_tokens += max(0, prompt_done - request.num_prompt_tokens_seen)
            request.num_prompt_tokens_seen = max(request.num_prompt_tokens_seen, prompt_done)
        now = time.monotonic()
        for request, result in zip(sampling, self._sample_isolated(sampling, logits), strict=True):
            if result is None:
                continue
            self._append_token(request, result, now, stats)
        return [c.request for c in scheduled.chunks]

    def _sample_isolated(self, requests: list[Request], logits: torch.Tensor) -> list[SampleResult | None]:
        """Sample every row; a row that breaks the sampler fails its own request only."""
        if not requests:
            return []
        # A row sum is non-finite exactly when the row holds a NaN or an infinity (logits are far from overflow);
        # summing first costs ~1 ms where an elementwise isfinite over [B, vocab] cost ~30 ms.
        finite = logits.sum(dim=-1).isfinite().tolist()
        healthy = [i for i, ok in enumerate(finite) if ok]
        results: list[SampleResult | None] = [None] * len(requests)
        for i, ok in enumerate(finite):
            if not ok:
                self.fail_request(requests[i], "the model produced non-finite logits for this request")
        try:
            for i, result in zip(
                healthy, self.runner.sample([requests[i] for i in healthy], logits[healthy]), strict=True
            ):
                results[i] = result
        except Exception:  # find the request that breaks the sampler, keep the others
            log.exception("sampling failed for a batch; retrying request by request")
            for i in healthy:
                try:
                    results[i] = self.runner.sample([requests[i]], logits[i : i + 1])[0]
                except Exception as error:  # noqa: BLE001 - one request's failure must not stop the engine
                    self.fail_request(requests[i], f"sampling failed: {error}")
        return results

    def _append_token(self, request: Request, result: SampleResult, now: float, stats: StepStats) -> None:
        request.output_token_ids.append(result.token_id)
        if result.logprobs is not None:
            request.output_logprobs.append(result.logprobs)
        stats.num_generation_tokens += 1
        if request.first_token_time is None:
            request.first_token_time = now
            stats.time_to_first_token.append(now - request.arrival_time)
        else:
            stats.inter_token_latency.append(now - (request.last_token_time or now))
        request.last_token_time = now
        status = self._stop_status(request, result.token_id)
        if status is not None:
            self._finish(request, status)

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
            if not params.ignore_eos and token_id in self.tokenizer.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_tokens >= request.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status.finished:
            return
        self.scheduler.remove(request, status)
        self.observer.on_request_finished(request)

    def _output_of(self, request: Request) -> RequestOutput:
        reported = self._reported.get(request.request_id, 0)
        self._reported[request.request_id] = request.num_output_tokens
        finished = request.status.finished
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=request.output_token_ids[reported:],
            new_logprobs=request.output_logprobs[reported:],
            finished=finished,
            finish_reason=request.status.value if finished else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            error=request.error,
            stop_reason=request.stop_reason,
        )

    def _forget_finished(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if output.finished:
                self.requests.pop(output.request_id, None)
                self._reported.pop(output.request_id, None)
