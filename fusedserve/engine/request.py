"""One engine request: its tokens, how many of them are in the KV cache, and where its KV lives.

State lives here and nowhere else. The scheduler moves requests between queues and advances
`num_computed_tokens`; the model runner only reads them; the engine appends sampled tokens.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fusedserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_total_tokens: int  # prompt + the most output tokens this request may produce
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Tokens whose K/V are in the cache. After preemption it drops to 0 and catches up again (recompute).
    num_computed_tokens: int = 0
    slot: int | None = None  # the KV-cache row this request owns while running
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    # The furthest prompt position ever computed, so recompute after preemption is not counted as new prompt.
    num_prompt_tokens_seen: int = 0
    error: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    # The request's own random stream when params.seed is set; the sampler creates it on first use.
    generator: torch.Generator | None = None
    # Timestamps (monotonic seconds) for metrics.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens


@dataclass
class TokenLogprobs:
    """Logprob of the sampled token and the top alternatives at one position (token id -> logprob)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    """What the engine reports for one request after a step: the tokens that are new since the last report."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it, if any
