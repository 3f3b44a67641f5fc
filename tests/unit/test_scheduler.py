"""The scheduler's one rule: budgets, chunked prefill, admission by memory, preemption by recompute."""

from __future__ import annotations

import torch

from fusedserve.engine.config import SchedulerConfig
from fusedserve.engine.kv_cache import KVCache, KVCacheSpec, KVUsage
from fusedserve.engine.request import Request, RequestStatus
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.scheduler import Scheduler


class TokenBudgetKVCache(KVCache):
    """A KV cache whose only resource is a count of token positions (one position = one 'page')."""

    def __init__(self, spec: KVCacheSpec, capacity_tokens: int) -> None:
        super().__init__(spec)
        self.capacity = capacity_tokens
        self.key_cache, self.value_cache = [], []

    def used(self) -> int:
        return sum(self._lengths.values())

    def can_admit(self, num_tokens: int) -> bool:
        return self.num_free_slots > 0 and self.used() + num_tokens <= self.capacity

    def usage(self, live_tokens: int) -> KVUsage:
        return KVUsage(self.used(), live_tokens, self.capacity, len(self._lengths), self.used() / self.capacity)

    def _grow_slot_memory(self, slot: int, num_tokens: int) -> bool:
        return self.used() - self._lengths[slot] + num_tokens <= self.capacity

    def _release_slot_memory(self, slot: int) -> None:
        return None


def make_scheduler(capacity: int = 10_000, max_num_seqs: int = 8, budget: int = 64) -> Scheduler:
    spec = KVCacheSpec(1, max_num_seqs, 512, 1, 8, torch.float32)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=512, max_num_batched_tokens=budget)
    return Scheduler(config, TokenBudgetKVCache(spec, capacity))


def make_request(name: str, prompt_len: int) -> Request:
    return Request(name, list(range(3, 3 + prompt_len)), SamplingParams(), max_total_tokens=512)


def run_step(scheduler: Scheduler) -> dict[str, int]:
    """Apply one schedule as the engine would: advance computed tokens, append a token where one is sampled."""
    out = scheduler.schedule()
    for chunk in out.chunks:
        samples = chunk.samples
        chunk.request.num_computed_tokens += chunk.num_tokens
        if samples:
            chunk.request.output_token_ids.append(7)
    return {c.request.request_id: c.num_tokens for c in out.chunks}


def test_long_prompt_is_chunked_under_the_token_budget():
    scheduler = make_scheduler(budget=16)
    request = make_request("a", 40)
    scheduler.add(request)
    assert run_step(scheduler) == {"a": 16}
    assert request.output_token_ids == []
    assert run_step(scheduler) == {"a": 16}
    assert run_step(scheduler) == {"a": 8}
    assert request.output_token_ids == [7]  # the last chunk samples


def test_decodes_go_before_prefill_chunks():
    scheduler = make_scheduler(budget=16)
    first = make_request("first", 4)
    scheduler.add(first)
    run_step(scheduler)  # first is now decoding
    scheduler.add(make_request("second", 40))
    step = run_step(scheduler)
    assert step == {"first": 1, "second": 15}
    assert list(step)[0] == "first"


def test_budget_is_never_exceeded_with_many_requests():
    scheduler = make_scheduler(budget=32)
    for i in range(6):
        scheduler.add(make_request(f"r{i}", 20))
    for _ in range(10):
        assert sum(run_step(scheduler).values()) <= 32


def test_admission_waits_for_a_free_slot():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 4))
    assert set(run_step(scheduler)) == {"r0", "r1"}
    assert [r.request_id for r in scheduler.waiting] == ["r2"]
    scheduler.remove(scheduler.running[0], RequestStatus.FINISHED_STOPPED)
    assert "r2" in run_step(scheduler)


def test_admission_waits_for_kv_memory_not_max_model_len():
    scheduler = make_scheduler(capacity=30)
    scheduler.add(make_request("a", 20))
    scheduler.add(make_request("b", 20))
    assert set(run_step(scheduler)) == {"a"}  # b's 20 tokens do not fit beside a's


def test_preemption_by_recompute_when_the_cache_cannot_grow():
    scheduler = make_scheduler(capacity=22)
    old, new = make_request("old", 10), make_request("new", 10)
    scheduler.add(old)
    scheduler.add(new)
    run_step(scheduler)  # both prefilled: 20 of 22 positions
    run_step(scheduler)  # both grow to 11: 22 positions
    step = run_step(scheduler)  # old needs a 12th position: the newest request makes room
    assert step == {"old": 1}
    assert new.status is RequestStatus.WAITING and new.slot is None
    assert new.num_computed_tokens == 0 and new.output_token_ids == [7, 7]  # keeps its output, recomputes
    assert scheduler.waiting[0] is new and scheduler.num_preemptions_total == 1


def test_preempted_request_catches_up_and_samples_once_resumed():
    scheduler = make_scheduler(capacity=22)
    old, new = make_request("old", 10), make_request("new", 10)
    scheduler.add(old)
    scheduler.add(new)
    for _ in range(3):
        run_step(scheduler)
    scheduler.remove(old, RequestStatus.FINISHED_STOPPED)
    step = run_step(scheduler)
    assert step == {"new": new.num_prompt_tokens + 2}  # prompt plus its two outputs, in one recompute chunk
    assert new.output_token_ids == [7, 7, 7]


def test_a_request_that_can_never_fit_is_reported_unservable():
    scheduler = make_scheduler(capacity=8)
    scheduler.add(make_request("huge", 20))
    out = scheduler.schedule()
    assert [r.request_id for r in out.unservable] == ["huge"]
    assert not scheduler.waiting
