"""Run mapping: pages a slot needs at once come as runs, each run maps with one call, and nothing else changes."""

from __future__ import annotations

import random

import pytest
import torch
from kv_contents import fill_slot, slot_holds

from fusedserve.engine.kv_cache import KVCacheSpec
from fusedserve.engine.vattention.backend import BackendError
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache
from fusedserve.engine.vattention.page_pool import PagePool

PAGE = 4096
# per_layer: 4 regions (K, V of 2 layers); 2 heads x 8 dims x 4 bytes = 64 bytes per token: 64 tokens per page
SPEC = KVCacheSpec(num_layers=2, max_num_seqs=6, max_model_len=1024, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TOKENS_PER_PAGE = 64
REGIONS = 2 * SPEC.num_layers


def _cache(pages: int = 48, map_runs: bool = True, prefault: bool = False) -> VAttentionKVCache:
    backend = CpuMemoryBackend(prefault=prefault)
    return VAttentionKVCache(
        SPEC,
        PAGE,
        pages * PAGE * REGIONS,
        layout="per_layer",
        backend=backend,
        watermark=0.0,
        map_ahead_tokens=0,
        map_runs=map_runs,
    )


def _mappings_in(start: int, end: int) -> list[tuple[int, int, str]]:
    """(low, high, permissions) of the VMAs inside [start, end)."""
    return [(low, high, perms) for low, high, perms in _mappings() if low >= start and high <= end]


def _mapping_at(address: int) -> tuple[int, int, str]:
    """(low, high, permissions) of the VMA holding `address`."""
    return next(vma for vma in _mappings() if vma[0] <= address < vma[1])


def _mappings() -> list[tuple[int, int, str]]:
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            found.append((low, high, fields[1]))
    return found


def test_a_run_of_consecutive_pages_maps_with_one_call_per_region():
    cache = _cache()
    slot = cache.allocate_slot()
    assert cache.reserve_tokens(slot, 5 * TOKENS_PER_PAGE)
    assert cache.pages_of(slot) == 5 and cache.stats.pages_mapped == 5
    assert cache.stats.map_calls == REGIONS  # one run of 5 pages in each region
    cache.close()


def test_the_page_at_a_time_path_maps_the_same_pages_with_one_call_each():
    cache = _cache(map_runs=False)
    slot = cache.allocate_slot()
    assert cache.reserve_tokens(slot, 5 * TOKENS_PER_PAGE)
    assert cache.pages_of(slot) == 5 and cache.stats.map_calls == 5 * REGIONS
    fill_slot(cache, slot, 5 * TOKENS_PER_PAGE, 2.0)
    assert slot_holds(cache, slot, 5 * TOKENS_PER_PAGE, 2.0)
    cache.close()


def test_contents_survive_growth_by_runs():
    cache = _cache()
    slot = cache.allocate_slot()
    assert cache.reserve_tokens(slot, 3 * TOKENS_PER_PAGE - 5)
    fill_slot(cache, slot, 3 * TOKENS_PER_PAGE - 5, 4.0)
    assert cache.reserve_tokens(slot, 9 * TOKENS_PER_PAGE)  # six more pages: one more run per region
    assert slot_holds(cache, slot, 3 * TOKENS_PER_PAGE - 5, 4.0)
    fill_slot(cache, slot, 9 * TOKENS_PER_PAGE, 6.0)
    assert slot_holds(cache, slot, 9 * TOKENS_PER_PAGE, 6.0)
    cache.close()


def test_the_tail_past_a_run_stays_inaccessible():
    cache = _cache()
    slot = cache.allocate_slot()
    assert cache.reserve_tokens(slot, 4 * TOKENS_PER_PAGE)
    for region in range(REGIONS):
        row = cache._allocator.geometry.page_address(region, slot, 0)
        assert _mapping_at(row) == (row, row + 4 * PAGE, "rw-s")  # the run: one shared, writable mapping
        assert _mapping_at(row + 4 * PAGE)[2] == "---p"  # the rest of the row: no access, as before
    cache.close()


def test_map_pages_splits_at_physical_gaps_and_maps_each_handle_at_its_address():
    backend = CpuMemoryBackend(prefault=True)
    base = backend.reserve(16 * PAGE, PAGE)
    handles = [backend.create_physical(PAGE) for _ in range(8)]
    order = [handles[i] for i in (0, 1, 2, 6, 7, 4)]  # runs: 0-2, 6-7, 4
    assert backend.map_pages(base, PAGE, order) == 3
    memory = backend.wrap_tensor(base, 16 * PAGE)
    for index in range(6):
        memory[index * PAGE : (index + 1) * PAGE] = index + 1
    backend.unmap_pages(base, PAGE, 6)
    assert all(perms == "---p" for _, _, perms in _mappings_in(base, base + 16 * PAGE))
    assert backend.map_pages(base + 8 * PAGE, PAGE, handles) == 1  # the same pages again, in memfd order
    expected = {0: 1, 1: 2, 2: 3, 6: 4, 7: 5, 4: 6, 3: 0, 5: 0}
    for page, value in expected.items():
        assert bool((memory[(8 + page) * PAGE : (9 + page) * PAGE] == value).all())
    backend.close()


def test_map_pages_stays_inside_the_reservation_and_checks_every_handle():
    backend = CpuMemoryBackend(prefault=False)
    base = backend.reserve(4 * PAGE, PAGE)
    handles = [backend.create_physical(PAGE) for _ in range(3)]
    with pytest.raises(BackendError):
        backend.map_pages(base + 2 * PAGE, PAGE, handles)  # would run past the reservation
    with pytest.raises(BackendError):
        backend.map_pages(base, PAGE, [handles[0], 12345])
    with pytest.raises(BackendError):
        backend.map_pages(base, 2 * PAGE, handles[:1])  # wrong page size
    assert all(perms == "---p" for _, _, perms in _mappings_in(base, base + 4 * PAGE))  # nothing mapped
    backend.close()


def test_discarding_a_run_returns_its_memory():
    backend = CpuMemoryBackend(prefault=True)
    base = backend.reserve(8 * PAGE, PAGE)
    handles = [backend.create_physical(PAGE) for _ in range(8)]
    backend.map_pages(base, PAGE, handles)
    assert backend.committed_bytes() == 8 * PAGE
    backend.unmap_pages(base, PAGE, 8)
    backend.discard_pages(handles[2:5] + handles[6:8])
    assert backend.committed_bytes() == 3 * PAGE
    backend.close()


def test_pool_takes_a_multi_page_request_as_one_run_where_one_fits():
    pool = PagePool(32)
    pool.take_pages(16)  # pages 0-15
    taken = pool.take_pages(12)  # the free run [16, 32): from its middle would overflow, so shifted left
    assert taken == list(range(20, 32))
    assert pool.num_free == 4 and pool.num_runs == 1


def test_pool_splits_a_multi_page_request_over_fragmented_runs():
    pool = PagePool(20)
    pool.take_pages(20)
    for page in (1, 2, 5, 6, 7, 12, 17, 18):  # free runs: [1, 3), [5, 8), [12, 13), [17, 19)
        pool.give_back(page)
    assert (pool.num_runs, pool.largest_run) == (4, 3)
    taken = pool.take_pages(6)
    assert taken == [5, 6, 7, 1, 2, 18]  # largest run first, then the next largest; a last page from a middle
    assert len(set(taken)) == 6 and not any(pool.is_free(page) for page in taken)
    assert pool.num_free == 2 and pool.num_runs == 2
    assert pool.take_pages(1, after=11) == [12]  # a slot's next page extends its run when free
    with pytest.raises(LookupError):
        pool.take_pages(2)  # one left: refused whole, nothing taken
    assert pool.num_free == 1


def test_a_freed_run_is_reused_and_its_memory_returned():
    cache = _cache(pages=8, prefault=True)
    first = cache.allocate_slot()
    assert cache.reserve_tokens(first, 8 * TOKENS_PER_PAGE)
    cache.free_slot(first)
    assert cache.release_idle_pages() == 8
    assert cache.backend.committed_bytes() == 0 and cache.usage(0).bytes_mapped == 0
    second = cache.allocate_slot()
    assert cache.reserve_tokens(second, 8 * TOKENS_PER_PAGE)  # the whole budget again, from the pool
    assert cache.stats.pages_moved == 0 and cache.stats.map_calls == 2 * REGIONS
    fill_slot(cache, second, 8 * TOKENS_PER_PAGE, 9.0)
    assert slot_holds(cache, second, 8 * TOKENS_PER_PAGE, 9.0)
    cache.close()


def test_pages_moved_from_an_idle_slot_keep_their_order_and_carry_data():
    cache = _cache(pages=8)
    idle, growing = cache.allocate_slot(), cache.allocate_slot()
    assert cache.reserve_tokens(idle, 8 * TOKENS_PER_PAGE)
    cache.free_slot(idle)
    assert cache.reserve_tokens(growing, 5 * TOKENS_PER_PAGE)
    assert cache.pages_of(growing) == 5 and cache.pages_of(idle) == 3 and cache.stats.pages_moved == 5
    assert cache.stats.map_calls == 2 * REGIONS  # the idle slot's tail arrives as one run, not five pages
    fill_slot(cache, growing, 5 * TOKENS_PER_PAGE, 3.0)
    assert slot_holds(cache, growing, 5 * TOKENS_PER_PAGE, 3.0)
    cache.close()


def _replay(cache: VAttentionKVCache, seed: int) -> list[tuple[int, ...]]:
    """Random grows, frees and releases; returns the page counts after each operation."""
    rng = random.Random(seed)
    counts = []
    lengths: dict[int, int] = {}
    for _ in range(120):
        action = rng.random()
        if action < 0.25 and cache.num_free_slots:
            slot = cache.allocate_slot()
            lengths[slot] = 0
        elif action < 0.75 and lengths:
            slot = rng.choice(sorted(lengths))
            target = min(SPEC.max_model_len, lengths[slot] + rng.randint(1, 6 * TOKENS_PER_PAGE))
            if cache.reserve_tokens(slot, target):
                lengths[slot] = target
                fill_slot(cache, slot, target, float(slot))
        elif action < 0.9 and lengths:
            slot = rng.choice(sorted(lengths))
            cache.free_slot(slot)
            del lengths[slot]
        else:
            cache.release_idle_pages()
        stats = cache.stats
        counts.append(
            (
                *(cache.pages_of(s) for s in range(SPEC.max_num_seqs)),
                cache.usage(0).bytes_mapped,
                stats.pages_mapped,
                stats.pages_unmapped,
                stats.pages_moved,
                stats.pages_discarded,
            )
        )
        assert cache._allocator._runs == _runs_held(cache)  # the VMA estimate follows what is mapped
    assert all(slot_holds(cache, slot, length, float(slot)) for slot, length in lengths.items())
    return counts


def _runs_held(cache: VAttentionKVCache) -> int:
    return sum(
        sum(1 for index, page in enumerate(pages) if index == 0 or page != pages[index - 1] + 1)
        for pages in cache._allocator._pages
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_run_mapping_keeps_every_page_count_of_the_page_at_a_time_path(seed):
    old, new = _cache(pages=24, map_runs=False), _cache(pages=24)
    assert _replay(new, seed) == _replay(old, seed)
    assert new.stats.pages_moved > 0 and new.stats.pages_discarded > 0  # the replay moved and released pages
    assert new.stats.map_calls < old.stats.map_calls
    old.close()
    new.close()
