"""The vAttention page allocator: which physical pages back which slot, under a fixed page budget.

Invariants (one place owns each):
- A slot's mapped pages are always a prefix: page indexes [0, k) of the slot, in every region (tensor).
- `reserved[slot]` is the in-flight length: the model may read or write positions [0, reserved) of an active
  slot. Nothing below pages_for(reserved) is ever unmapped while the slot is active; pages above it (mapped
  ahead of need) may be taken back at any time.
- A freed slot keeps its pages (deferred reclamation): the next request is given the free slot holding the
  most pages, and growing slots take pages from the pool first, then from idle slots (oldest first, by moving
  the page: unmap there, map here, no copy), then from other active slots' mapped-ahead pages. A slot idle for
  `idle_release_steps` steps (or any idle slot when a step schedules nothing) gives its memory to the OS, and
  so do a reused slot's pages beyond what its new request needs (trimmed by the map-ahead worker).
- All bookkeeping and every map/unmap happen under one lock; the map-ahead worker is one thread whose future
  is joined before the next job is submitted and on close.
- A slot grows by whole batches: the pages it needs at once come from the pool as few runs of consecutive pages
  (PagePool.take_pages) and are mapped per region with one backend call (map_pages: one mmap per physically
  consecutive run on the CPU); pages leave a slot's tail as one range per region (unmap_pages, discard_pages).

It never reads or writes KV data and never decides who runs (the scheduler does, from grow()'s answer).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from fusedserve.engine.vattention.backend import MemoryBackend, PhysicalHandle
from fusedserve.engine.vattention.page_pool import PagePool


@dataclass(frozen=True)
class SlotGeometry:
    """Where slot s's page i sits: slots lie `slot_stride` bytes apart in region r, tokens `token_bytes`."""

    region_addresses: tuple[int, ...]
    num_slots: int
    slot_stride: int  # a whole number of pages
    token_bytes: int  # bytes one token occupies in one region
    page_size: int
    max_tokens: int

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.token_bytes // self.page_size)

    def page_address(self, region: int, slot: int, index: int) -> int:
        return self.region_addresses[region] + slot * self.slot_stride + index * self.page_size

    @property
    def num_regions(self) -> int:
        return len(self.region_addresses)

    @property
    def group_bytes(self) -> int:
        """Physical bytes behind one page index of a slot (one page in every region)."""
        return self.page_size * self.num_regions


@dataclass
class AllocatorStats:
    """Cumulative counters (in page groups: one page index of one slot, every region)."""

    pages_mapped: int = 0  # by reserve (on the critical path) and ahead (background)
    pages_mapped_ahead: int = 0
    pages_unmapped: int = 0
    pages_moved: int = 0  # taken from an idle or over-mapped slot instead of the pool
    pages_discarded: int = 0  # memory handed back to the OS
    map_calls: int = 0  # backend map calls (summed over regions): one per run on the CPU, one per page on CUDA
    map_seconds_per_page: deque[float] = field(default_factory=lambda: deque(maxlen=20000))


class PageAllocator:
    def __init__(
        self,
        backend: MemoryBackend,
        geometry: SlotGeometry,
        num_pages: int,
        map_ahead_tokens: int = 16,
        idle_release_steps: int = 32,
        max_mappings: int | None = None,
        map_runs: bool = True,
    ) -> None:
        """`map_runs=False` forces the page-at-a-time path (one pool page, one map call per page and region),
        kept so benchmarks/kv_map.py can measure what run mapping saves."""
        if num_pages <= 0:
            raise ValueError("the KV budget holds no page")
        self.backend = backend
        self.geometry = geometry
        self.num_pages = num_pages
        self.map_ahead_tokens = map_ahead_tokens
        self.idle_release_steps = idle_release_steps
        self.max_mappings = max_mappings  # CPU: a share of vm.max_map_count; None: no limit (CUDA)
        self.map_runs = map_runs
        if max_mappings is not None and self._mappings_with(0, runs=0) > max_mappings:
            raise ValueError(
                f"{geometry.num_slots} slots x {geometry.num_regions} regions need more kernel mappings than "
                f"the {max_mappings} allowed: use fewer slots or the all_layers layout"
            )
        self.stats = AllocatorStats()
        # Region-major creation: pages g and g+1 of a region are physical neighbours (one VMA on the CPU).
        self._handles: list[list[PhysicalHandle]] = [
            [backend.create_physical(geometry.page_size) for _ in range(num_pages)] for _ in range(geometry.num_regions)
        ]
        self._pool = PagePool(num_pages)
        self._pages: list[list[int]] = [[] for _ in range(geometry.num_slots)]
        self._runs = 0  # maximal runs of consecutive pool pages over all slots: each run is one VMA per region
        self._reserved = [0] * geometry.num_slots
        self._active: set[int] = set()
        self._idle: dict[int, int] = {}  # free slots holding pages, oldest first -> the step they went idle
        self._step = 0  # map-ahead jobs run so far: the allocator's clock
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, "kv-map-ahead", initializer=backend.bind_thread)
        self._ahead_job: Future[None] | None = None
        self._closed = False

    # -- slot lifecycle ----------------------------------------------------------------------------
    def activate(self, slot: int) -> None:
        with self._lock:
            self._idle.pop(slot, None)
            self._active.add(slot)
            self._reserved[slot] = 0

    def deactivate(self, slot: int) -> None:
        """The request left the slot; its pages stay mapped for the next request (deferred reclamation)."""
        with self._lock:
            self._active.discard(slot)
            self._reserved[slot] = 0
            if self._pages[slot]:
                self._idle[slot] = self._step

    def best_free_slot(self, free_slots: list[int], num_tokens: int | None = None) -> int | None:
        """The free slot whose mapped pages best serve a request of `num_tokens` (ties: the last in the list).

        Best fit: the fewest pages that still cover the request; if none covers it, the most pages.
        """
        with self._lock:
            ordered = list(reversed(free_slots))
            if num_tokens is not None:
                needed = self.geometry.pages_for(num_tokens)
                covering = [s for s in ordered if len(self._pages[s]) >= needed]
                if covering:
                    return min(covering, key=lambda s: len(self._pages[s]))
            return max(ordered, key=lambda s: len(self._pages[s]), default=None)

    # -- capacity ----------------------------------------------------------------------------------
    def available_pages(self) -> int:
        """Pages a request could get now: the pool, idle slots' pages and active slots' mapped-ahead pages."""
        with self._lock:
            return self._available(exclude=None)

    def mapped_pages(self) -> int:
        with self._lock:
            return self.num_pages - self._pool.num_free

    def active_pages(self) -> int:
        with self._lock:
            return sum(len(self._pages[s]) for s in self._active)

    def mapping_estimate(self) -> int:
        """Kernel mappings the cache's ranges hold now (CPU): one per run per region, plus each slot's tail."""
        with self._lock:
            return self._mappings_with(0, self._runs)

    def free_runs(self) -> tuple[int, int]:
        """(runs of consecutive free pool pages, pages in the largest): how fragmented the pool is."""
        with self._lock:
            return self._pool.num_runs, self._pool.largest_run

    def pages_of(self, slot: int) -> int:
        with self._lock:
            return len(self._pages[slot])

    # -- growing -----------------------------------------------------------------------------------
    def grow(self, slot: int, num_tokens: int) -> bool:
        """Map the slot's pages for [0, num_tokens) now (its in-flight length). False: memory short."""
        with self._lock:
            if slot not in self._active:
                raise KeyError(f"slot {slot} is not active")
            missing = self.geometry.pages_for(num_tokens) - len(self._pages[slot])
            if missing > 0:
                if missing > self._pool.num_free and missing > self._available(exclude=slot):
                    return False
                if self._mapping_room() < missing:  # refusing (-> preemption) beats running out of VMAs
                    return False
                self._extend(slot, missing, steal_from_active=True, ahead=False)
            self._reserved[slot] = max(self._reserved[slot], num_tokens)
            return True

    def map_ahead(self, upcoming_lengths: dict[int, int]) -> None:
        """Join the previous map-ahead job, then map pages for these lengths on the worker thread."""
        self.wait()
        if self._closed:
            return
        targets = dict(upcoming_lengths)
        self._ahead_job = self._executor.submit(self._map_ahead_job, targets)

    def wait(self) -> None:
        """Join the in-flight map-ahead job (re-raising its error, if any)."""
        job, self._ahead_job = self._ahead_job, None
        if job is not None:
            job.result()

    def _map_ahead_job(self, targets: dict[int, int]) -> None:
        """Map each slot up to its target (+ map_ahead_tokens), trim beyond it, release stale idle slots."""
        with self._lock:
            self._step += 1
            cutoff = self._step - self.idle_release_steps
            for slot in [s for s, since in self._idle.items() if since <= cutoff or not targets]:
                self._release_pages(slot, keep=0)
                del self._idle[slot]
        for slot, length in targets.items():
            with self._lock:
                if slot not in self._active:
                    continue
                wanted = self.geometry.pages_for(min(self.geometry.max_tokens, length + self.map_ahead_tokens))
                wanted = max(wanted, self.geometry.pages_for(self._reserved[slot]))
                missing = wanted - len(self._pages[slot])
                if missing < 0:  # a reused slot holds more than its request needs: give the surplus back
                    self._release_pages(slot, keep=wanted)
                missing = min(missing, self._pool.num_free + self._idle_page_count(), self._mapping_room())
                if missing > 0:
                    self._extend(slot, missing, steal_from_active=False, ahead=True)

    # -- giving memory back ------------------------------------------------------------------------
    def release_idle_pages(self) -> int:
        """Unmap every idle slot's pages and return their memory to the OS; returns how many pages."""
        with self._lock:
            released = sum(self._release_pages(slot, keep=0) for slot in self._idle)
            self._idle.clear()
            return released

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.wait()
        self._executor.shutdown(wait=True)
        with self._lock:
            for slot in range(self.geometry.num_slots):
                for page in self._pop_pages(slot, len(self._pages[slot])):
                    self._pool.give_back(page)
            self._idle.clear()
            for region_handles in self._handles:
                for handle in region_handles:
                    self.backend.release_physical(handle)
            self._handles = []

    # -- internals (lock held) ---------------------------------------------------------------------
    def _release_pages(self, slot: int, keep: int) -> int:
        """Unmap the slot's pages from index `keep` on and give their memory back to the OS and the pool."""
        released = self._pop_pages(slot, len(self._pages[slot]) - keep)
        self._discard(released)
        for page in released:
            self._pool.give_back(page)
        return len(released)

    def _mappings_with(self, extra_runs: int, runs: int) -> int:
        return (runs + extra_runs + self.geometry.num_slots) * self.geometry.num_regions

    def _mapping_room(self) -> int:
        """New pages that can be mapped even if each starts a run of its own."""
        if self.max_mappings is None:
            return self.num_pages
        return max(0, (self.max_mappings - self._mappings_with(0, self._runs)) // self.geometry.num_regions)

    def _idle_page_count(self) -> int:
        return sum(len(self._pages[s]) for s in self._idle)

    def _excess_pages(self, slot: int) -> int:
        return len(self._pages[slot]) - self.geometry.pages_for(self._reserved[slot])

    def _available(self, exclude: int | None) -> int:
        excess = sum(self._excess_pages(s) for s in self._active if s != exclude)
        return self._pool.num_free + self._idle_page_count() + excess

    def _extend(self, slot: int, count: int, steal_from_active: bool, ahead: bool) -> None:
        """Append `count` pages to the slot's prefix: pool first, then idle slots, then over-mapped slots."""
        pages = self._pages[slot]
        taken = self._take_from_pool(min(count, self._pool.num_free), pages[-1] if pages else None)
        for victim in list(self._idle):
            moved = min(count - len(taken), len(self._pages[victim]))
            if moved > 0:
                taken.extend(self._pop_pages(victim, moved))
                self.stats.pages_moved += moved
            if not self._pages[victim]:
                del self._idle[victim]
        if steal_from_active:
            for victim in list(self._active):
                moved = min(count - len(taken), self._excess_pages(victim)) if victim != slot else 0
                if moved > 0:
                    taken.extend(self._pop_pages(victim, moved))
                    self.stats.pages_moved += moved
        if len(taken) < count:
            raise RuntimeError(f"allocator accounting drifted: wanted {count} pages, found {len(taken)}")
        self._map_run(slot, len(pages), taken)
        for page in taken:
            if not pages or page != pages[-1] + 1:
                self._runs += 1
            pages.append(page)
        self.stats.pages_mapped += len(taken)
        if ahead:
            self.stats.pages_mapped_ahead += len(taken)

    def _take_from_pool(self, count: int, after: int | None) -> list[int]:
        if self.map_runs:
            return self._pool.take_pages(count, after)
        taken: list[int] = []
        for _ in range(count):
            after = self._pool.take(after=after)
            taken.append(after)
        return taken

    def _map_run(self, slot: int, first_index: int, pages: list[int]) -> None:
        """Map `pages` at the slot's page indexes first_index.. in every region, readable and writable."""
        started = time.perf_counter()
        size = self.geometry.page_size
        for region in range(self.geometry.num_regions):
            start = self.geometry.page_address(region, slot, first_index)
            handles = self._handles[region]
            if self.map_runs:
                self.stats.map_calls += self.backend.map_pages(start, size, [handles[page] for page in pages])
                continue
            for offset, page in enumerate(pages):
                self.backend.map(start + offset * size, size, handles[page])
            self.backend.set_access(start, size * len(pages))
            self.stats.map_calls += len(pages)
        per_page = (time.perf_counter() - started) / len(pages)
        self.stats.map_seconds_per_page.extend([per_page] * len(pages))

    def _pop_pages(self, slot: int, count: int) -> list[int]:
        """Unmap the slot's last `count` pages (one range per region); returns them in slot order."""
        pages = self._pages[slot]
        if count <= 0:
            return []
        first = len(pages) - count
        self.backend.before_unmap()  # a GPU may still run kernels queued before this point
        for region in range(self.geometry.num_regions):
            address = self.geometry.page_address(region, slot, first)
            self.backend.unmap_pages(address, self.geometry.page_size, count)
        popped = pages[first:]
        del pages[first:]
        for index, page in enumerate(popped):
            previous = popped[index - 1] if index else (pages[-1] if pages else None)
            if previous is None or page != previous + 1:
                self._runs -= 1
        self.stats.pages_unmapped += count
        return popped

    def _discard(self, pages: list[int]) -> None:
        if not pages:
            return
        for region in range(self.geometry.num_regions):
            handles = self._handles[region]
            self.backend.discard_pages([handles[page] for page in pages])
        self.stats.pages_discarded += len(pages)
