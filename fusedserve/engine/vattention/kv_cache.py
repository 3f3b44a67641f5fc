"""VAttentionKVCache: the engine's KV tensors over reserved virtual memory, physically backed page by page.

The tensors keep the engine's layout (per layer, K and V of shape [max_num_seqs, max_model_len, kv_heads,
head_dim]) and are created once over one reservation; their data_ptr never changes. Two physical layouts sit
behind them:
- "all_layers" (the CUDA default): one region whose token record holds every layer's K and V
  ([L, 2, kv_heads, head_dim]); per-layer tensors are strided views. One page covers all layers, so a slot grows
  with one mapping per page and wastes at most one partly filled page; but a layer's rows lie a whole record
  apart, which the CPU decode kernel reads ~1.3-2x slower than contiguous rows (TLB misses, 4 KiB pages).
- "per_layer" (the CPU default, 32 KiB pages): 2·L regions (K of each layer, then V), each [slots, tokens,
  kv_heads, head_dim] contiguous, as in the vAttention reference; a slot grows with 2·L mappings and wastes up
  to 2·L partial pages, so it needs small pages (which stock CUDA drivers do not offer: 2 MiB minimum).
benchmarks/kv_layout.py measured the choice (docs/results/kv_layout.json). Slot rows are padded to whole pages
so that no page is shared by two slots.

It never reads or writes the tensors itself, and nothing may read past a slot's reserved length (unmapped
memory is a SIGSEGV on the CPU). After close() the tensors are dangling and must not be touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fusedserve.engine.kv_cache import KVCache, KVCacheSpec, KVUsage
from fusedserve.engine.vattention.allocator import AllocatorStats, PageAllocator, SlotGeometry
from fusedserve.engine.vattention.backend import MemoryBackend
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend

LAYOUTS = ("all_layers", "per_layer")
# (layout, page size) per device type, chosen by benchmarks/kv_layout.py (docs/results/kv_layout.json). On the CPU
# the decode kernel reads contiguous per-layer rows faster than all-layers records; on a GPU the stock driver's
# 2 MiB granularity makes per-layer pages far too coarse (not measured on a GPU).
DEVICE_DEFAULTS = {"cpu": ("per_layer", 32 * 1024), "cuda": ("all_layers", 2 * 1024 * 1024)}
MAPPING_SHARE = 0.5  # the share of vm.max_map_count the KV cache may use on the CPU
DEFAULT_MAP_AHEAD_TOKENS = 0  # the engine's hint already names next step's length; more only idles
DEFAULT_IDLE_RELEASE_STEPS = 32  # a freed slot keeps its pages this many steps for the next request
DEFAULT_WATERMARK = 0.01  # share of pages admission leaves free for running requests to grow into


@dataclass(frozen=True)
class MemoryPlan:
    """How a spec maps onto pages: regions (tensors), per-slot strides, the page budget."""

    num_regions: int
    token_bytes: int  # one token in one region
    slot_stride: int  # bytes per slot per region, a whole number of pages
    num_pages: int  # page groups the budget buys (one page in every region)
    page_size: int
    num_slots: int

    @property
    def region_bytes(self) -> int:
        return self.slot_stride * self.num_slots

    @property
    def reservation_bytes(self) -> int:
        return self.region_bytes * self.num_regions


def plan_memory(spec: KVCacheSpec, page_size: int, budget_bytes: int, layout: str) -> MemoryPlan:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    element = torch.empty((), dtype=spec.dtype).element_size()
    row_bytes = spec.num_kv_heads * spec.head_dim * element  # one token, one layer, K or V
    num_regions = 1 if layout == "all_layers" else 2 * spec.num_layers
    token_bytes = row_bytes * (2 * spec.num_layers if layout == "all_layers" else 1)
    pages_per_slot = math.ceil(spec.max_model_len * token_bytes / page_size)
    num_pages = min(budget_bytes // (page_size * num_regions), pages_per_slot * spec.max_num_seqs)
    if num_pages < 1:
        raise ValueError(f"KV budget {budget_bytes} bytes is less than one page in each of {num_regions} regions")
    return MemoryPlan(num_regions, token_bytes, pages_per_slot * page_size, num_pages, page_size, spec.max_num_seqs)


def _slot_row_bytes(spec: KVCacheSpec, layout: str, granularity: int) -> int:
    """One slot's full-length range in one region, rounded up to the granularity."""
    element = torch.empty((), dtype=spec.dtype).element_size()
    regions_per_token = 2 * spec.num_layers if layout == "all_layers" else 1
    row = spec.max_model_len * spec.num_kv_heads * spec.head_dim * element * regions_per_token
    return -(-row // granularity) * granularity


def max_map_count() -> int:
    """The kernel's limit on memory mappings (VMAs) per process."""
    try:
        with open("/proc/sys/vm/max_map_count") as limit:
            return int(limit.read())
    except OSError:
        return 65530  # the kernel's default


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
        page_size: int | None = None,
        memory_budget_bytes: int | None = None,
        device: torch.device | str = "cpu",
        *,
        layout: str | None = None,
        backend: MemoryBackend | None = None,
        map_ahead_tokens: int = DEFAULT_MAP_AHEAD_TOKENS,
        idle_release_steps: int = DEFAULT_IDLE_RELEASE_STEPS,
        watermark: float = DEFAULT_WATERMARK,
        map_runs: bool = True,
    ) -> None:
        """`page_size` and `layout` default to the device's measured choice (DEVICE_DEFAULTS); `map_runs=False`
        forces page-at-a-time mapping (for benchmarks/kv_map.py)."""
        super().__init__(spec)
        default_layout, default_page = DEVICE_DEFAULTS.get(torch.device(device).type, DEVICE_DEFAULTS["cpu"])
        layout = layout or default_layout
        page_size = page_size or default_page
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        if page_size <= 0:
            raise ValueError(f"page size must be positive, not {page_size}")
        self.backend = backend if backend is not None else make_backend(device)
        try:
            plan = self._plan(spec, page_size, memory_budget_bytes, layout)
            self._allocator = self._make_allocator(plan, map_ahead_tokens, idle_release_steps, map_runs)
        except BaseException:
            if backend is None:  # ours: close it (files, reservations); a caller's backend stays the caller's
                self.backend.close()
            raise
        self._watermark_pages = math.ceil(watermark * plan.num_pages)
        element = torch.empty((), dtype=spec.dtype).element_size()
        self._build_tensors(plan.slot_stride // element, plan.region_bytes // element)
        self._closed = False
        self._admission_hint: int | None = None  # the length can_admit last approved (best-fit slot choice)

    def _plan(self, spec: KVCacheSpec, page_size: int, budget: int | None, layout: str) -> MemoryPlan:
        granularity = self.backend.granularity  # stock CUDA drivers: 2 MiB; the CPU: 4 KiB
        page_size = -(-page_size // granularity) * granularity
        page_size = min(page_size, _slot_row_bytes(spec, layout, granularity))  # a bigger page is pure waste
        self.layout = layout
        self.page_size = page_size
        budget = budget if budget is not None else self.static_bytes(spec)
        self.plan = plan_memory(spec, page_size, budget, layout)
        return self.plan

    def _make_allocator(
        self, plan: MemoryPlan, map_ahead_tokens: int, idle_release_steps: int, map_runs: bool
    ) -> PageAllocator:
        # Every mapping that cannot merge with its neighbour costs a kernel VMA on the CPU; the allocator refuses
        # growth (the scheduler then preempts) before the cache's share of vm.max_map_count runs out.
        max_mappings = int(MAPPING_SHARE * max_map_count()) if self.backend.device.type == "cpu" else None
        self._base = self.backend.reserve(plan.reservation_bytes, plan.page_size)
        geometry = SlotGeometry(
            region_addresses=tuple(self._base + r * plan.region_bytes for r in range(plan.num_regions)),
            num_slots=self.spec.max_num_seqs,
            slot_stride=plan.slot_stride,
            token_bytes=plan.token_bytes,
            page_size=plan.page_size,
            max_tokens=self.spec.max_model_len,
        )
        try:
            return PageAllocator(
                self.backend, geometry, plan.num_pages, map_ahead_tokens, idle_release_steps, max_mappings, map_runs
            )
        except BaseException:
            self.backend.free_reservation(self._base, plan.reservation_bytes)
            raise

    @staticmethod
    def static_bytes(spec: KVCacheSpec) -> int:
        """What the static backend reserves for this spec: every slot at max_model_len."""
        return spec.bytes_per_token * spec.max_model_len * spec.max_num_seqs

    def _build_tensors(self, slot_stride: int, region_stride: int) -> None:
        spec = self.spec
        flat = self.backend.wrap_tensor(self._base, self.plan.reservation_bytes).view(spec.dtype)
        size = spec.shape
        row = spec.num_kv_heads * spec.head_dim
        if self.layout == "all_layers":
            stride = (slot_stride, 2 * spec.num_layers * row, spec.head_dim, 1)
            self.key_cache = [flat.as_strided(size, stride, 2 * layer * row) for layer in range(spec.num_layers)]
            self.value_cache = [
                flat.as_strided(size, stride, (2 * layer + 1) * row) for layer in range(spec.num_layers)
            ]
        else:
            stride = (slot_stride, row, spec.head_dim, 1)
            self.key_cache = [flat.as_strided(size, stride, layer * region_stride) for layer in range(spec.num_layers)]
            self.value_cache = [
                flat.as_strided(size, stride, (spec.num_layers + layer) * region_stride)
                for layer in range(spec.num_layers)
            ]

    # -- the KVCache interface ---------------------------------------------------------------------
    def allocate_slot(self) -> int | None:
        """A free slot, preferring the one whose pages are still mapped (deferred reclamation)."""
        hint, self._admission_hint = self._admission_hint, None
        best = self._allocator.best_free_slot(self._free_slots, hint)
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
        self._admission_hint = num_tokens  # the scheduler allocates a slot for this request next
        needed = self._allocator.geometry.pages_for(num_tokens)
        # The watermark keeps room for running requests to grow; with none running a request may use it all.
        watermark = self._watermark_pages if self.num_free_slots < self.spec.max_num_seqs else 0
        return needed <= self._allocator.available_pages() - watermark

    def usage(self, live_tokens: int) -> KVUsage:
        group = self._allocator.geometry.group_bytes
        return KVUsage(
            bytes_mapped=self._allocator.mapped_pages() * group,
            bytes_live=live_tokens * self.spec.bytes_per_token,
            bytes_budget=self._allocator.num_pages * group,
            slots_in_use=self.spec.max_num_seqs - self.num_free_slots,
            usage_perc=self._allocator.active_pages() / self._allocator.num_pages,
            pages_mapped_total=self.stats.pages_mapped,
            pages_unmapped_total=self.stats.pages_unmapped,
        )

    def prepare_next_step(self, upcoming_lengths: dict[int, int]) -> None:
        """Map pages for the lengths slots reach next on the background thread (joined on the next call)."""
        self._allocator.map_ahead(upcoming_lengths)

    def release_idle_memory(self) -> None:
        self._allocator.wait()
        self._allocator.release_idle_pages()

    def step_queued(self) -> None:
        """Mark the step's queued kernels; the backend waits for them before any later unmap (CUDA)."""
        self.backend.record_queued_work()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.key_cache, self.value_cache = [], []
        self._allocator.close()
        self.backend.free_reservation(self._base, self.plan.reservation_bytes)
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

    def free_runs(self) -> tuple[int, int]:
        """(runs of consecutive free pages, pages in the largest run)."""
        return self._allocator.free_runs()

    def mapping_estimate(self) -> int:
        """Kernel mappings (VMAs) the cache's ranges hold now, as the allocator counts them (CPU)."""
        return self._allocator.mapping_estimate()

    def wait_for_map_ahead(self) -> None:
        self._allocator.wait()

    def release_idle_pages(self) -> int:
        """Unmap the pages of finished requests' slots and give their memory back to the OS."""
        return self._allocator.release_idle_pages()
