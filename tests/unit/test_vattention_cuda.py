"""The CUDA backend's call sequence, run against the emulated cuda-python driver (no GPU needed)."""

from __future__ import annotations

import threading

import pytest
import torch

from fusedserve.engine.kv_cache import KVCacheSpec
from fusedserve.engine.vattention.backend import BackendError
from fusedserve.engine.vattention.cuda_backend import CudaMemoryBackend
from fusedserve.engine.vattention.dlpack import KDL_CUDA, dlpack_capsule
from fusedserve.engine.vattention.emulated_driver import EmulatedCudaDriver
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache

GRANULARITY = 64 * 1024
SPEC = KVCacheSpec(
    num_layers=2, max_num_seqs=4, max_model_len=1024, num_kv_heads=2, head_dim=8, dtype=torch.float32
)  # 256 bytes per token: 256 tokens per 64 KiB page


@pytest.fixture
def driver():
    driver = EmulatedCudaDriver(granularity=GRANULARITY, memory_bytes=16 * GRANULARITY)
    yield driver
    driver.close()


def _backend(driver: EmulatedCudaDriver) -> CudaMemoryBackend:
    return CudaMemoryBackend(0, driver=driver, tensor_device=torch.device("cpu"))


def _cache(driver: EmulatedCudaDriver, pages: int = 8) -> VAttentionKVCache:
    backend = _backend(driver)
    return VAttentionKVCache(
        SPEC, GRANULARITY, pages * GRANULARITY, layout="all_layers", backend=backend, watermark=0.0, map_ahead_tokens=0
    )


def test_setup_queries_granularity_reserves_then_creates_the_pool_up_front(driver):
    cache = _cache(driver)
    names = driver.call_names()
    assert names[:3] == ["cuCtxGetCurrent", "cuMemGetAllocationGranularity", "cuMemAddressReserve"]
    assert names[3:] == ["cuMemCreate"] * 8
    assert driver.allocated_bytes == 8 * GRANULARITY
    cache.close()


def test_growth_maps_each_page_then_sets_access_once_over_the_run(driver):
    cache = _cache(driver)
    slot = cache.allocate_slot()
    start = len(driver.calls)
    assert cache.reserve_tokens(slot, 600)  # 3 pages
    calls = driver.calls[start:]
    assert [name for name, _ in calls] == ["cuMemMap"] * 3 + ["cuMemSetAccess"]
    addresses = [args[0] for _, args in calls[:3]]
    assert addresses == [addresses[0] + i * GRANULARITY for i in range(3)]
    assert calls[3][1][:2] == (addresses[0], 3 * GRANULARITY)
    cache.key_cache[1][slot, :600] = 2.5
    assert float(cache.key_cache[1][slot, :600].sum()) == 2.5 * 600 * 16
    cache.close()


def test_map_ahead_thread_makes_the_context_current_before_mapping(driver):
    cache = _cache(driver)
    slot = cache.allocate_slot()
    cache.reserve_tokens(slot, 10)
    start = len(driver.calls)
    cache.prepare_next_step({slot: 700})
    cache.wait_for_map_ahead()
    names = [name for name, _ in driver.calls[start:]]
    assert names == ["cuCtxSetCurrent", "cuMemMap", "cuMemMap", "cuMemSetAccess"]
    cache.close()


def test_moving_a_page_unmaps_it_before_mapping_it_elsewhere(driver):
    cache = _cache(driver, pages=4)
    idle, growing = cache.allocate_slot(), cache.allocate_slot()
    cache.reserve_tokens(idle, 4 * 256)
    cache.free_slot(idle)
    start = len(driver.calls)
    assert cache.reserve_tokens(growing, 256)
    names = [name for name, _ in driver.calls[start:]]
    assert names == ["cuMemUnmap", "cuMemMap", "cuMemSetAccess"]
    cache.close()


def test_close_unmaps_releases_every_page_and_frees_the_range_last(driver):
    cache = _cache(driver)
    slot = cache.allocate_slot()
    cache.reserve_tokens(slot, 1000)
    cache.close()
    names = driver.call_names()
    tail = names[names.index("cuMemUnmap") :]
    assert tail == ["cuMemUnmap"] * 4 + ["cuMemRelease"] * 8 + ["cuMemAddressFree"]
    assert driver.allocated_bytes == 0


def test_a_thread_without_the_context_is_refused_until_bound(driver):
    backend = _backend(driver)
    base = backend.reserve(4 * GRANULARITY)
    page = backend.create_physical(GRANULARITY)
    errors: list[Exception] = []

    def map_from_a_new_thread(bind: bool) -> None:
        try:
            if bind:
                backend.bind_thread()
            backend.map(base, GRANULARITY, page)
        except BackendError as error:
            errors.append(error)

    for bind in (False, True):
        thread = threading.Thread(target=map_from_a_new_thread, args=(bind,))
        thread.start()
        thread.join()
    assert len(errors) == 1 and "INVALID_CONTEXT" in str(errors[0])
    backend.unmap(base, GRANULARITY)
    backend.close()


def test_the_driver_refuses_double_maps_and_oversubscription(driver):
    backend = _backend(driver)
    base = backend.reserve(4 * GRANULARITY)
    page = backend.create_physical(GRANULARITY)
    other = backend.create_physical(GRANULARITY)
    backend.map(base, GRANULARITY, page)
    with pytest.raises(BackendError, match="cuMemMap"):
        backend.map(base, GRANULARITY, other)
    with pytest.raises(BackendError, match="cuMemSetAccess"):
        backend.set_access(base, 2 * GRANULARITY)  # the second page is not mapped
    with pytest.raises(BackendError, match="cuMemCreate"):
        backend.create_physical(15 * GRANULARITY)
    backend.unmap(base, GRANULARITY)
    backend.close()


def test_tensor_wrapper_describes_cuda_memory_with_an_explicit_device():
    _capsule, record = dlpack_capsule(0x7F0000000000, 4096, torch.device("cuda", 3))
    device = record.managed.dl_tensor.device
    assert (device.device_type, device.device_id) == (KDL_CUDA, 3)
    assert record.managed.dl_tensor.data == 0x7F0000000000 and record.shape[0] == 4096
