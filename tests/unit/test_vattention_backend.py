"""The CPU memory backend and page pool: mapping keeps data, memory returns to the OS, maps stay in bounds."""

from __future__ import annotations

import pytest
import torch

from fusedserve.engine.vattention.backend import BackendError
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
from fusedserve.engine.vattention.page_pool import PagePool

PAGE = 1 << 20  # 1 MiB: big enough for RSS to show it, small enough to keep the test light


@pytest.fixture
def backend():
    backend = CpuMemoryBackend(prefault=True)
    yield backend
    backend.close()


def _rss_shmem_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


def _mappings_in(start: int, end: int) -> list[str]:
    """Lines of /proc/self/maps for the VMAs inside [start, end)."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            if low >= start and high <= end:
                found.append(line)
    return found


def test_remapped_page_keeps_its_data_at_the_new_address(backend):
    base = backend.reserve(4 * PAGE, PAGE)
    memory = backend.wrap_tensor(base, 4 * PAGE)
    page = backend.create_physical(PAGE)
    backend.map(base, PAGE, page)
    backend.set_access(base, PAGE)
    memory[:PAGE] = torch.arange(PAGE, dtype=torch.int64).to(torch.uint8)
    backend.unmap(base, PAGE)
    backend.map(base + 2 * PAGE, PAGE, page)
    backend.set_access(base + 2 * PAGE, PAGE)
    assert torch.equal(memory[2 * PAGE : 3 * PAGE], torch.arange(PAGE, dtype=torch.int64).to(torch.uint8))
    assert memory.data_ptr() == base


def test_unmapped_range_becomes_inaccessible_again(backend):
    base = backend.reserve(2 * PAGE, PAGE)
    page = backend.create_physical(PAGE)
    backend.map(base, PAGE, page)
    backend.set_access(base, PAGE)
    assert _mappings_in(base, base + PAGE)[0].split()[1].startswith("rw")
    backend.unmap(base, PAGE)
    assert all(line.split()[1].startswith("---") for line in _mappings_in(base, base + 2 * PAGE))


def test_discarded_page_memory_returns_to_the_os(backend):
    base = backend.reserve(8 * PAGE, PAGE)
    pages = [backend.create_physical(PAGE) for _ in range(8)]
    before = _rss_shmem_bytes()
    for index, page in enumerate(pages):
        backend.map(base + index * PAGE, PAGE, page)
    backend.set_access(base, 8 * PAGE)  # prefaults: memory is committed here
    assert backend.committed_bytes() == 8 * PAGE
    assert _rss_shmem_bytes() - before >= 7 * PAGE
    backend.unmap(base, 8 * PAGE)
    for page in pages:
        backend.discard(page)
    assert backend.committed_bytes() == 0
    assert _rss_shmem_bytes() - before <= PAGE


def test_maps_outside_or_across_the_reservation_are_rejected(backend):
    base = backend.reserve(4 * PAGE, PAGE)
    page = backend.create_physical(PAGE)
    for address in (base + 4 * PAGE, base - PAGE, base + 3 * PAGE + 4096, base + 100):
        with pytest.raises(BackendError):
            backend.map(address, PAGE, page)
    with pytest.raises(BackendError):
        backend.unmap(base + 3 * PAGE, 2 * PAGE)
    with pytest.raises(BackendError):
        backend.set_access(base - 4096, 4096)


def test_map_rejects_unknown_handles_and_wrong_sizes(backend):
    base = backend.reserve(4 * PAGE, PAGE)
    page = backend.create_physical(PAGE)
    with pytest.raises(BackendError):
        backend.map(base, PAGE, page + 12345)
    with pytest.raises(BackendError):
        backend.map(base, 2 * PAGE, page)


def test_consecutive_pages_at_consecutive_addresses_share_one_vma(backend):
    base = backend.reserve(16 * PAGE, PAGE)
    pages = [backend.create_physical(PAGE) for _ in range(16)]
    for index in range(8):  # ascending offsets at ascending addresses: mergeable
        backend.map(base + index * PAGE, PAGE, pages[index])
    for index in range(8, 16):  # descending offsets: every page its own VMA
        backend.map(base + index * PAGE, PAGE, pages[23 - index])
    backend.set_access(base, 16 * PAGE)
    assert len(_mappings_in(base, base + 8 * PAGE)) == 1
    assert len(_mappings_in(base + 8 * PAGE, base + 16 * PAGE)) == 8


def test_page_pool_extends_runs_and_spreads_new_ones():
    pool = PagePool(64)
    first = pool.take()
    assert first == 0 and pool.take(after=first) == 1
    newcomer = pool.take()
    assert newcomer == 2 + 62 // 2  # the middle of the largest free run [2, 64)
    assert pool.take(after=newcomer) == newcomer + 1
    assert pool.take(after=1) == 2


def test_page_pool_merges_returned_pages_into_one_run():
    pool = PagePool(8)
    taken = [pool.take(after=i - 1 if i else None) for i in range(8)]
    assert pool.num_free == 0
    for page in (3, 5, 4, 0, 7, 6, 1, 2):
        pool.give_back(page)
    assert pool.num_free == 8 and pool.num_runs == 1
    with pytest.raises(ValueError):
        pool.give_back(taken[0])
