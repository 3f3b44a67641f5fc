"""VAttentionKVCache: the engine's KV tensors over reserved virtual memory, physically backed page by page.

The tensors keep the engine's layout (per layer, K and V of shape [max_num_seqs, max_model_len, kv_heads,
head_dim]) and are created once over one reservation; their data_ptr never changes. Two physical layouts sit
behind them:
- "all_layers" (default, chosen by benchmarks/kv_layout.py): one region whose token record holds every layer's
  K and V ([L, 2, kv_heads, head_dim]); per-layer tensors are strided views. One page covers all layers, so a
  slot grows with one mapping per page and wastes at most one partly filled page.
- "per_layer": 2·L regions (K of each layer, then V), each [slots, tokens, kv_heads, head_dim] contiguous, as
  in the vAttention reference; a slot grows with 2·L mappings and wastes up to 2·L partial pages.
Slot rows are padded to whole pages so that no page is shared by two slots.

It never reads or writes the tensors itself, and nothing may read past a slot's reserved length (unmapped
memory is a SIGSEGV on the CPU). After close() the tensors are dangling and must not be touched.
"""

from __future__ import annotations

import math

import torch

from fusedserve.engine.kv_cache import KVCache, KVCacheSpec, KVUsage
from fusedserve.engine.vattention.allocator import AllocatorStats, PageAllocator, SlotGeometry
from fusedserve.engine.vattention.backend import MemoryBackend
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend

LAYOUTS = ("all_layers", "per_layer")
DEFAULT_PAGE_SIZE = 2 * 1024 * 1024  # chosen by benchmarks/kv_layout.py (docs/results/kv_layout.json)
DEFAULT_MAP_AHEAD_TOKENS = 16
DEFAULT_WATERMARK = 0.01  # share of pages admission leaves free for running requests to grow into


def make_backend(device: torch.device | str) -> MemoryBackend:
    """The memory backend for a device: mmap/memfd on the CPU, cuda-python VMM on a GPU (imported lazily)."""
    device = torch.device(device)
    if device.type == "cpu":
        return CpuMemoryBackend()
    if device.type == "cuda":
        from fusedserve.engine.vattention.cuda_backend import CudaMemoryBackend

        return CudaMemoryBackend(device)
    raise ValueError(f"vAttention has no memory backend for device {device}")


class VAttentionKVCache(KVCache):
    def __init__(
        self,
        spec: KVCacheSpec,
        page_size: int = DEFAULT_PAGE_SIZE,
        memory_budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
        *,
        layout: str = "all_layers",
        backend: MemoryBackend | None = None,
        map_ahead_tokens: int = DEFAULT_MAP_AHEAD_TOKENS,
        watermark: float = DEFAULT_WATERMARK,
    ) -> None:
        super().__init__(spec)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        self.backend = backend if backend is not None else make_backend(device)
        if page_size <= 0:
            raise ValueError(f"page size must be positive, not {page_size}")
        granularity = self.backend.granularity  # stock CUDA drivers: 2 MiB; the CPU: 4 KiB
        page_size = -(-page_size // granularity) * granularity
        self.layout = layout
        self.page_size = page_size
        element = torch.empty((), dtype=spec.dtype).element_size()
        row_bytes = spec.num_kv_heads * spec.head_dim * element  # one token, one layer, K or V
        num_regions = 1 if layout == "all_layers" else 2 * spec.num_layers
        token_bytes = row_bytes * (2 * spec.num_layers if layout == "all_layers" else 1)
        slot_stride = math.ceil(spec.max_model_len * token_bytes / page_size) * page_size
        region_bytes = slot_stride * spec.max_num_seqs
        self._reservation_bytes = region_bytes * num_regions
        self._base = self.backend.reserve(self._reservation_bytes, page_size)
        geometry = SlotGeometry(
            region_addresses=tuple(self._base + r * region_bytes for r in range(num_regions)),
            num_slots=spec.max_num_seqs,
            slot_stride=slot_stride,
            token_bytes=token_bytes,
            page_size=page_size,
            max_tokens=spec.max_model_len,
        )
        budget = memory_budget_bytes if memory_budget_bytes is not None else self.static_bytes(spec)
        num_pages = min(
            budget // geometry.group_bytes, geometry.pages_for(spec.max_model_len) * spec.max_num_seqs
        )
        if num_pages < 1:
            raise ValueError(
                f"KV budget {budget} bytes is less than one page group ({geometry.group_bytes} bytes)"
            )
        self._allocator = PageAllocator(self.backend, geometry, num_pages, map_ahead_tokens)
        self._watermark_pages = math.ceil(watermark * num_pages)
        self._build_tensors(element, slot_stride // element, region_bytes // element)
        self._closed = False

    @staticmethod
    def static_bytes(spec: KVCacheSpec) -> int:
        """What the static backend reserves for this spec: every slot at max_model_len."""
        return spec.bytes_per_token * spec.max_model_len * spec.max_num_seqs

    def _build_tensors(self, element: int, slot_stride: int, region_stride: int) -> None:
        spec = self.spec
        flat = self.backend.wrap_tensor(self._base, self._reservation_bytes).view(spec.dtype)
        size = spec.shape
        row = spec.num_kv_heads * spec.head_dim
        if self.layout == "all_layers":
            stride = (slot_stride, 2 * spec.num_layers * row, spec.head_dim, 1)
            self.key_cache = [
                flat.as_strided(size, stride, 2 * layer * row) for layer in range(spec.num_layers)
            ]
            self.value_cache = [
                flat.as_strided(size, stride, (2 * layer + 1) * row) for layer in range(spec.num_layers)
            ]
        else:
            stride = (slot_stride, row, spec.head_dim, 1)
            self.key_cache = [
                flat.as_strided(size, stride, layer * region_stride) for layer in range(spec.num_layers)
            ]
            self.value_cache = [
                flat.as_strided(size, stride, (spec.num_layers + layer) * region_stride)
                for layer in range(spec.num_layers)
            ]

    # -- the KVCache interface ---------------------------------------------------------------------
    def allocate_slot(self) -> int | None:
        """A free slot, preferring the one whose pages are still mapped (deferred reclamation)."""
        best = self._allocator.best_free_slot(self._free_slots)
        if best is not None:
            self._free_slots.remove(best)
            self._free_slots.append(best)  # the base class hands out the last free slot
        slot = super().allocate_slot()
        if slot is not None:
            self._allocator.activate(slot)
        return slot

    def can_admit(self, num_tokens: int) -> bool:
        if self.num_free_slots == 0 or num_tokens > self.spec.max_model_len:
            return False
        needed = self._allocator.geometry.pages_for(num_tokens)
        return needed <= self._allocator.available_pages() - self._watermark_pages

    def usage(self, live_tokens: int) -> KVUsage:
        group = self._allocator.geometry.group_bytes
        return KVUsage(
            bytes_mapped=self._allocator.mapped_pages() * group,
            bytes_live=live_tokens * self.spec.bytes_per_token,
            bytes_budget=self._allocator.num_pages * group,
            slots_in_use=self.spec.max_num_seqs - self.num_free_slots,
            usage_perc=self._allocator.active_pages() / self._allocator.num_pages,
        )

    def prepare_next_step(self, upcoming_lengths: dict[int, int]) -> None:
        """Map pages for the lengths slots reach next on the background thread (joined on the next call)."""
        self._allocator.map_ahead(upcoming_lengths)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.key_cache, self.value_cache = [], []
        self._allocator.close()
        self.backend.free_reservation(self._base, self._reservation_bytes)
        self.backend.close()

    def _grow_slot_memory(self, slot: int, num_tokens: int) -> bool:
        return self._allocator.grow(slot, num_tokens)

    def _release_slot_memory(self, slot: int) -> None:
        self._allocator.deactivate(slot)

    # -- introspection for metrics, tests and benchmarks -------------------------------------------
    @property
    def stats(self) -> AllocatorStats:
        return self._allocator.stats

    @property
    def num_pages(self) -> int:
        return self._allocator.num_pages

    @property
    def page_group_bytes(self) -> int:
        return self._allocator.geometry.group_bytes

    def pages_of(self, slot: int) -> int:
        return self._allocator.pages_of(slot)

    def wait_for_map_ahead(self) -> None:
        self._allocator.wait()

    def release_idle_pages(self) -> int:
        """Unmap the pages of finished requests' slots and give their memory back to the OS."""
        return self._allocator.release_idle_pages()
