"""What the engine reports about itself, for metrics: one record per step and each finished request.

The engine calls an `EngineObserver` from its own thread; the server's Prometheus exporter implements it. The
engine never imports the server: the observer is handed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fusedserve.engine.kv_cache import KVUsage
from fusedserve.engine.request import Request


@dataclass
class StepStats:
    step_seconds: float
    num_scheduled_tokens: int  # prefill chunks + decodes run this step
    num_prompt_tokens: int  # tokens of prompts computed for the first time this step (recompute excluded)
    num_generation_tokens: int  # tokens sampled this step
    num_running: int
    num_waiting: int
    num_preemptions: int  # preempted during this step
    kv_usage: KVUsage
    time_to_first_token: list[float] = field(default_factory=list)  # for requests whose first token came now
    inter_token_latency: list[float] = field(default_factory=list)  # gaps since each request's previous token
    pages_mapped: int = 0  # vAttention: pages mapped / unmapped this step
    pages_unmapped: int = 0


class EngineObserver(Protocol):
    def on_step(self, stats: StepStats) -> None: ...

    def on_request_finished(self, request: Request) -> None: ...


class NullObserver:
    def on_step(self, stats: StepStats) -> None:
        return None

    def on_request_finished(self, request: Request) -> None:
        return None
