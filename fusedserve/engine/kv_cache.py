"""The KV cache in the vAttention layout, and its static (reserve-everything-up-front) backend.

Per layer there is one K and one V tensor of shape [max_num_seqs, max_model_len, num_kv_heads, head_dim].
A running request owns one slot (a row); attention reads only `K[slot, :length]`, so backends may leave the
memory behind unused positions unbacked. The KV cache owns memory: the scheduler asks it for slots and room
(`allocate_slot`, `reserve_tokens`, `free_slot`), the model runner reads and writes the tensors, and nobody
else maps or frees anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    max_num_seqs: int
    max_model_len: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        """K and V bytes one token occupies across all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.max_num_seqs, self.max_model_len, self.num_kv_heads, self.head_dim)


@dataclass
class KVUsage:
    bytes_mapped: int  # physical bytes backing the cache now
    bytes_live: int  # bytes holding tokens of running requests
    bytes_budget: int  # the most physical bytes the cache may use
    slots_in_use: int
    usage_perc: float  # 0..1, what vllm:kv_cache_usage_perc reports: the share of KV capacity in use
    pages_mapped_total: int = 0  # demand-paged backends: pages mapped / unmapped since start (cumulative)
    pages_unmapped_total: int = 0


class KVCache(ABC):
    """What the engine needs from KV memory; backends differ only in how physical memory follows tokens."""

    spec: KVCacheSpec
    key_cache: list[torch.Tensor]
    value_cache: list[torch.Tensor]

    def __init__(self, spec: KVCacheSpec) -> None:
        self.spec = spec
        self._free_slots = list(range(spec.max_num_seqs - 1, -1, -1))
        self._lengths: dict[int, int] = {}  # slot -> tokens reserved for it

    # -- slots -------------------------------------------------------------------------------------
    def allocate_slot(self) -> int | None:
        """A free slot with no tokens reserved yet, or None when every slot is taken."""
        if not self._free_slots:
            return None
        slot = self._free_slots.pop()
        self._lengths[slot] = 0
        return slot

    def free_slot(self, slot: int) -> None:
        """Give the slot back; its memory is released or recycled as the backend sees fit."""
        del self._lengths[slot]
        self._release_slot_memory(slot)
        self._free_slots.append(slot)

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def reserved_length(self, slot: int) -> int:
        return self._lengths[slot]

    # -- room for tokens ---------------------------------------------------------------------------
    def reserve_tokens(self, slot: int, num_tokens: int) -> bool:
        """Make positions [0, num_tokens) of `slot` writable. False (and nothing changed) if memory is short."""
        if num_tokens > self.spec.max_model_len:
            raise ValueError(f"{num_tokens} tokens exceed max_model_len {self.spec.max_model_len}")
        if num_tokens <= self._lengths[slot]:
            return True
        if not self._grow_slot_memory(slot, num_tokens):
            return False
        self._lengths[slot] = num_tokens
        return True

    @abstractmethod
    def can_admit(self, num_tokens: int) -> bool:
        """Whether a new request needing `num_tokens` of room now could get a slot and the memory for it."""

    @abstractmethod
    def usage(self, live_tokens: int) -> KVUsage:
        """Memory accounting; `live_tokens` is the number of tokens running requests hold."""

    def prepare_next_step(self, upcoming_lengths: dict[int, int]) -> None:  # noqa: B027 - optional hook
        """Hint, after scheduling: the lengths slots will reach soon. Demand-paged backends map ahead here."""

    def release_idle_memory(self) -> None:  # noqa: B027 - optional hook
        """The engine has nothing left to run: give memory that no request holds back (demand-paged backends).
        Returns once it is given back, so usage() read next is current."""

    def step_queued(self) -> None:  # noqa: B027 - optional hook
        """The runner has queued this step's kernels (a GPU may still run them): memory they read must outlive
        them. Device backends mark the point here and wait for it before unmapping anything."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release everything (background threads, mappings)."""

    @abstractmethod
    def _grow_slot_memory(self, slot: int, num_tokens: int) -> bool: ...

    @abstractmethod
    def _release_slot_memory(self, slot: int) -> None: ...


class StaticKVCache(KVCache):
    """The baseline: every slot owns max_model_len positions from the start (what a static allocator reserves).

    Admission is by free slots only, and the budget is the whole reservation, however few tokens are live.
    """

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu") -> None:
        super().__init__(spec)
        # torch.empty: the reservation is accounted in full (that is the baseline being measured), while the
        # operating system only commits pages on first write, so a large static cache does not exhaust RAM here.
        self.key_cache = [torch.empty(spec.shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
        self.value_cache = [
            torch.empty(spec.shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self._reserved_bytes = spec.bytes_per_token * spec.max_model_len * spec.max_num_seqs

    def can_admit(self, num_tokens: int) -> bool:
        return self.num_free_slots > 0 and num_tokens <= self.spec.max_model_len

    def usage(self, live_tokens: int) -> KVUsage:
        return KVUsage(
            bytes_mapped=self._reserved_bytes,
            bytes_live=live_tokens * self.spec.bytes_per_token,
            bytes_budget=self._reserved_bytes,
            slots_in_use=self.spec.max_num_seqs - self.num_free_slots,
            usage_perc=(self.spec.max_num_seqs - self.num_free_slots) / self.spec.max_num_seqs,
        )

    def _grow_slot_memory(self, slot: int, num_tokens: int) -> bool:
        return True

    def _release_slot_memory(self, slot: int) -> None:
        return None
