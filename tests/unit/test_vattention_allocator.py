"""VAttentionKVCache and its allocator: pages follow lengths, freed pages get reused, budgets hold."""

from __future__ import annotations

import threading

import pytest
import torch
from kv_contents import fill_slot, slot_holds

from fusedserve.engine.config import CacheConfig
from fusedserve.engine.kv_cache import KVCacheSpec, StaticKVCache
from fusedserve.engine.vattention import create_kv_cache
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache

PAGE = 4096
# 2 layers x (K, V) x 2 heads x 8 dims x 4 bytes = 256 bytes per token: 16 tokens per page (all_layers)
SPEC = KVCacheSpec(num_layers=2, max_num_seqs=4, max_model_len=256, num_kv_heads=2, head_dim=8, dtype=torch.float32)
TOKENS_PER_PAGE = 16


def _cache(pages: int = 32, layout: str = "all_layers", **kwargs) -> VAttentionKVCache:
    groups = 1 if layout == "all_layers" else 2 * SPEC.num_layers
    backend = CpuMemoryBackend(prefault=False)
    defaults = dict(layout=layout, backend=backend, watermark=0.0, map_ahead_tokens=0)
    return VAttentionKVCache(SPEC, PAGE, pages * PAGE * groups, **(defaults | kwargs))


@pytest.fixture
def cache():
    cache = _cache()
    yield cache
    cache.close()


def test_pages_follow_the_reserved_length(cache):
    slot = cache.allocate_slot()
    for length, pages in ((1, 1), (16, 1), (17, 2), (100, 7), (256, 16)):
        assert cache.reserve_tokens(slot, length)
        assert cache.pages_of(slot) == pages
    assert cache.usage(live_tokens=256).bytes_mapped == 16 * PAGE


@pytest.mark.parametrize("layout", ["all_layers", "per_layer"])
def test_layers_keys_and_values_do_not_overlap(layout):
    cache = _cache(layout=layout)
    slots = [cache.allocate_slot() for _ in range(3)]
    for index, slot in enumerate(slots):
        assert cache.reserve_tokens(slot, 40 + index)
        fill_slot(cache, slot, 40 + index, 10.0 * (index + 1))
    assert all(slot_holds(cache, slot, 40 + i, 10.0 * (i + 1)) for i, slot in enumerate(slots))
    cache.close()


def test_tensors_keep_their_address_across_growth_and_reuse(cache):
    pointers = [t.data_ptr() for t in cache.key_cache + cache.value_cache]
    slot = cache.allocate_slot()
    cache.reserve_tokens(slot, 200)
    cache.free_slot(slot)
    assert [t.data_ptr() for t in cache.key_cache + cache.value_cache] == pointers


def test_map_ahead_maps_the_next_steps_pages_off_the_calling_thread(cache):
    slot = cache.allocate_slot()
    cache.reserve_tokens(slot, 10)
    cache.prepare_next_step({slot: 40})
    cache.wait_for_map_ahead()
    assert cache.pages_of(slot) == 3 and cache.stats.pages_mapped_ahead == 2
    mapped = cache.stats.pages_mapped
    assert cache.reserve_tokens(slot, 40)
    assert cache.stats.pages_mapped == mapped  # nothing left to map on the critical path


def test_freed_slot_and_its_pages_go_to_the_next_request(cache):
    first = cache.allocate_slot()
    cache.reserve_tokens(first, 64)
    fill_slot(cache, first, 64, 1.0)
    cache.free_slot(first)
    assert cache.usage(0).bytes_mapped == 4 * PAGE  # deferred: still mapped
    second = cache.allocate_slot()
    assert second == first and cache.pages_of(second) == 4
    mapped = cache.stats.pages_mapped
    assert cache.reserve_tokens(second, 64)
    assert cache.stats.pages_mapped == mapped


def test_growth_moves_pages_from_idle_slots_when_the_pool_is_empty():
    cache = _cache(pages=8)
    idle, growing = cache.allocate_slot(), cache.allocate_slot()
    assert cache.reserve_tokens(idle, 8 * TOKENS_PER_PAGE)
    cache.free_slot(idle)
    assert cache.reserve_tokens(growing, 5 * TOKENS_PER_PAGE)
    assert cache.pages_of(growing) == 5 and cache.pages_of(idle) == 3
    assert cache.stats.pages_moved == 5
    fill_slot(cache, growing, 5 * TOKENS_PER_PAGE, 3.0)
    assert slot_holds(cache, growing, 5 * TOKENS_PER_PAGE, 3.0)
    cache.close()


def test_budget_exhaustion_refuses_growth_and_changes_nothing():
    cache = _cache(pages=8)
    a, b = cache.allocate_slot(), cache.allocate_slot()
    assert cache.reserve_tokens(a, 6 * TOKENS_PER_PAGE)
    fill_slot(cache, a, 6 * TOKENS_PER_PAGE, 5.0)
    assert not cache.reserve_tokens(b, 3 * TOKENS_PER_PAGE)
    assert cache.reserved_length(b) == 0 and cache.pages_of(b) == 0
    assert not cache.can_admit(3 * TOKENS_PER_PAGE) and cache.can_admit(2 * TOKENS_PER_PAGE)
    assert cache.reserve_tokens(b, 2 * TOKENS_PER_PAGE)
    assert slot_holds(cache, a, 6 * TOKENS_PER_PAGE, 5.0)
    cache.close()


def test_pages_below_an_in_flight_length_are_never_taken():
    cache = _cache(pages=8, map_ahead_tokens=4 * TOKENS_PER_PAGE)
    a, b = cache.allocate_slot(), cache.allocate_slot()
    assert cache.reserve_tokens(a, 2 * TOKENS_PER_PAGE)
    fill_slot(cache, a, 2 * TOKENS_PER_PAGE, 7.0)
    cache.prepare_next_step({a: 2 * TOKENS_PER_PAGE})  # maps 4 pages ahead: a holds 6 of 8
    cache.wait_for_map_ahead()
    assert cache.pages_of(a) == 6
    assert cache.reserve_tokens(b, 6 * TOKENS_PER_PAGE)  # 2 from the pool, 4 of a's mapped-ahead pages
    assert cache.pages_of(a) == 2 and slot_holds(cache, a, 2 * TOKENS_PER_PAGE, 7.0)
    assert not cache.reserve_tokens(b, 7 * TOKENS_PER_PAGE)
    cache.close()


def test_admission_counts_free_and_reclaimable_pages_minus_the_watermark():
    cache = _cache(pages=40, watermark=0.1)  # 4 pages of watermark
    a, b = cache.allocate_slot(), cache.allocate_slot()
    cache.reserve_tokens(a, 16 * TOKENS_PER_PAGE)
    cache.reserve_tokens(b, 10 * TOKENS_PER_PAGE)  # 14 pages free
    assert cache.can_admit(10 * TOKENS_PER_PAGE) and not cache.can_admit(10 * TOKENS_PER_PAGE + 1)
    cache.free_slot(a)  # its 16 idle pages count as available
    assert cache.can_admit(16 * TOKENS_PER_PAGE)
    cache.close()


def test_releasing_idle_pages_gives_memory_back_to_the_os():
    backend = CpuMemoryBackend(prefault=True)
    cache = VAttentionKVCache(
        SPEC, PAGE, 32 * PAGE, layout="all_layers", backend=backend, watermark=0.0, map_ahead_tokens=0
    )
    slot = cache.allocate_slot()
    cache.reserve_tokens(slot, 128)
    assert backend.committed_bytes() == 8 * PAGE
    cache.free_slot(slot)
    cache.prepare_next_step({})  # an idle engine: the worker releases idle slots' pages
    cache.wait_for_map_ahead()
    assert backend.committed_bytes() == 0 and cache.usage(0).bytes_mapped == 0
    cache.close()


def test_close_joins_the_map_ahead_thread():
    cache = _cache()
    slot = cache.allocate_slot()
    cache.prepare_next_step({slot: 30})
    cache.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("kv-map-ahead")]
    assert cache.key_cache == [] and cache.value_cache == []


def test_factory_builds_each_backend_under_the_same_budget():
    slot_bytes = SPEC.bytes_per_token * SPEC.max_model_len
    static = create_kv_cache(SPEC, CacheConfig(kv_backend="static", kv_cache_memory=2 * slot_bytes), "cpu")
    assert isinstance(static, StaticKVCache) and static.spec.max_num_seqs == 2
    paged = create_kv_cache(SPEC, CacheConfig(kv_cache_memory=2 * slot_bytes, kv_page_size=PAGE), "cpu")
    assert isinstance(paged, VAttentionKVCache) and paged.spec.max_num_seqs == SPEC.max_num_seqs
    assert paged.usage(0).bytes_budget == 2 * slot_bytes
    paged.close()
    with pytest.raises(ValueError):
        create_kv_cache(SPEC, CacheConfig(kv_backend="paged"), "cpu")


def test_growth_is_refused_before_kernel_mappings_run_out():
    cache = _cache(pages=32)
    allocator = cache._allocator
    allocator.max_mappings = allocator.mapping_estimate() + 2  # room for two more runs of pages
    a, b = cache.allocate_slot(), cache.allocate_slot()
    assert cache.reserve_tokens(a, 2 * TOKENS_PER_PAGE)  # one run of two consecutive pages
    assert cache.reserve_tokens(b, TOKENS_PER_PAGE)  # a second run
    assert not cache.reserve_tokens(b, 3 * TOKENS_PER_PAGE)  # two more pages could each start a run
    assert allocator.mapping_estimate() <= allocator.max_mappings
    cache.close()
