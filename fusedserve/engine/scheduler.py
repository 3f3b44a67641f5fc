"""Chooses each step's work under a token budget; never touches tensors.

One rule covers everything (as in vLLM v1): a request's `num_computed_tokens` catches up with its tokens. Each
step, running requests that only need their next token (decodes) go first, then running requests still
prefilling get chunks, then waiting requests are admitted while the budget, a free slot and KV memory allow.
When the KV cache cannot grow a running request, the most recently arrived running request is preempted by
recompute: its slot is freed, its `num_computed_tokens` drops to 0, and it goes back to the front of the
queue keeping the tokens it already generated. Chunked prefill, resumption after preemption and plain decode
are all the same catch-up.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from fusedserve.engine.config import SchedulerConfig
from fusedserve.engine.kv_cache import KVCache
from fusedserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int  # new tokens computed this step: positions [num_computed_tokens, + num_tokens)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's known tokens, so a next token is sampled."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Waiting requests that can never fit the KV cache, even with nothing else running: the engine fails them.
    unservable: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCache) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions_total = 0

    # -- queue management ------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues for good (finished, aborted or failed) and free its slot."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._free_slot(request)
        request.status = status
        request.finished_time = time.monotonic()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def live_tokens(self) -> int:
        return sum(r.num_computed_tokens for r in self.running)

    # -- the step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1]
        prefilling = [r for r in self.running if r.num_uncomputed_tokens > 1]
        for request in decodes + prefilling:
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop to make room for an older request
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if self._make_room(request, num_tokens, out):
                out.chunks.append(ScheduledChunk(request, num_tokens))
                budget -= num_tokens
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        return out

    def _make_room(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Reserve KV room for the chunk, preempting newer requests if needed. False if `request` itself went."""
        assert request.slot is not None
        while not self.kv_cache.reserve_tokens(request.slot, request.num_computed_tokens + num_tokens):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        while budget > 0 and self.waiting:
            request = self.waiting[0]
            if len(self.running) >= self.config.max_num_seqs:
                break
            if not self.kv_cache.can_admit(request.num_tokens):
                if not self.running and not out.chunks:
                    self.waiting.popleft()
                    out.unservable.append(request)
                    continue
                break
            slot = self.kv_cache.allocate_slot()
            if slot is None:
                break
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self.kv_cache.reserve_tokens(slot, num_tokens):
                self.kv_cache.free_slot(slot)
                break
            self.waiting.popleft()
            request.slot = slot
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_tokens))
            budget -= num_tokens
        return budget

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self._free_slot(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)
        out.chunks = [c for c in out.chunks if c.request is not request]

    def _free_slot(self, request: Request) -> None:
        if request.slot is not None:
            self.kv_cache.free_slot(request.slot)
            request.slot = None
