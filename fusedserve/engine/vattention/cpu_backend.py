"""The CPU memory backend: the CUDA VMM API's shape built from mmap, a memfd and fallocate.

- reserve: mmap(PROT_NONE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE): address space only, no memory.
- physical page: an extent of one memfd (sparse; memory is committed on first touch, or by prefaulting).
- map: mmap(MAP_SHARED|MAP_FIXED, fd, offset) at the page's address, PROT_NONE until set_access (mprotect).
  map_pages maps each run of pages that are consecutive in the memfd with one mmap, readable and writable at
  once (map + set_access in one call; no mprotect), then prefaults the whole range with one madvise.
- unmap: map PROT_NONE anonymous memory over the range again (never munmap: another allocation could take the
  hole and a later MAP_FIXED would silently destroy it). The memfd keeps the page's data.
- discard: fallocate(PUNCH_HOLE) gives the page's memory back to the OS (MADV_DONTNEED would not, for shmem);
  discard_pages punches each run of consecutive extents with one call, unmap_pages a range with one mmap.

It must never touch an address outside its own reservations: every map/unmap/set_access goes through the
reservation table's bounds and alignment check first. Reading an unmapped (PROT_NONE) address is a SIGSEGV,
not a Python exception, so nothing here reads the memory it manages.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence

import torch

from fusedserve.engine.vattention.backend import BackendError, MemoryBackend, Reservation, ReservationTable
from fusedserve.engine.vattention.dlpack import DLPackRecord, tensor_over_memory

PROT_NONE = 0
PROT_READ_WRITE = mmap.PROT_READ | mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS = mmap.MAP_ANONYMOUS
MAP_FIXED = 0x10  # Linux; not exported by Python's mmap module
MAP_NORESERVE = 0x4000
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in writable, without touching them from Python
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise BackendError(f"{what} failed: {os.strerror(errno)} (errno {errno})")


def _mmap_checked(address: int, size: int, prot: int, flags: int, fd: int, offset: int, what: str) -> int:
    result = _mmap(address or None, size, prot, flags, fd, offset)
    if result is None or result == _MAP_FAILED:
        errno = ctypes.get_errno()
        raise BackendError(f"{what} failed: {os.strerror(errno)} (errno {errno})")
    return int(result)


class CpuMemoryBackend(MemoryBackend):
    """Host memory with the VMM API's shape; a physical page is an extent of one memfd, named by its offset.

    `prefault=True` makes set_access fault the pages in (MADV_POPULATE_WRITE), so the first write by the model
    does not take page faults on the critical path; the allocator calls set_access from its map-ahead thread.
    """

    def __init__(self, prefault: bool = True, name: str = "fusedserve-kv") -> None:
        self.granularity = mmap.PAGESIZE
        self.device = torch.device("cpu")
        self.prefault = prefault
        self._fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self._file_size = 0
        self._free_extents: dict[int, list[int]] = {}  # size -> offsets of released extents, for reuse
        self._extent_size: dict[int, int] = {}  # offset -> size of each live physical page
        self._reservations = ReservationTable()
        self._records: list[DLPackRecord] = []
        self._lock = threading.Lock()  # guards the file/extent bookkeeping; syscalls themselves are thread-safe
        self._closed = False

    @property
    def fd(self) -> int:
        return self._fd

    # -- virtual ranges ----------------------------------------------------------------------------
    def reserve(self, size: int, alignment: int = 0) -> int:
        alignment = max(alignment, self.granularity)
        if size <= 0 or size % self.granularity or alignment % self.granularity:
            raise BackendError(f"reserve size {size} / alignment {alignment} not multiples of {self.granularity}")
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE
        raw = _mmap_checked(0, size + alignment, PROT_NONE, flags, -1, 0, "reserve")
        start = -(-raw // alignment) * alignment
        if start > raw:  # trim the unaligned head and the tail left over by the over-reservation
            _check(_munmap(raw, start - raw), "munmap head")
        tail = raw + size + alignment - (start + size)
        if tail:
            _check(_munmap(start + size, tail), "munmap tail")
        with self._lock:
            self._reservations.add(Reservation(start, size))
        return start

    def free_reservation(self, address: int, size: int) -> None:
        with self._lock:
            self._reservations.remove(address, size)
        _check(_munmap(address, size), "munmap reservation")

    # -- physical pages ----------------------------------------------------------------------------
    def create_physical(self, size: int) -> int:
        if size <= 0 or size % self.granularity:
            raise BackendError(f"page size {size} is not a multiple of {self.granularity}")
        with self._lock:
            reusable = self._free_extents.get(size)
            if reusable:
                offset = reusable.pop()
            else:
                offset = self._file_size
                os.ftruncate(self._fd, offset + size)  # sparse: no memory until touched
                self._file_size = offset + size
            self._extent_size[offset] = size
        return offset

    def release_physical(self, handle: object) -> None:
        offset = self._page_offset(handle)
        size = self._extent_size[offset]
        self.discard(offset)
        with self._lock:
            del self._extent_size[offset]
            self._free_extents.setdefault(size, []).append(offset)

    def discard(self, handle: object) -> None:
        offset = self._page_offset(handle)
        flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        _check(_fallocate(self._fd, flags, offset, self._extent_size[offset]), "fallocate(PUNCH_HOLE)")

    # -- mapping -----------------------------------------------------------------------------------
    def map(self, address: int, size: int, handle: object) -> None:
        offset = self._page_offset(handle)
        if size != self._extent_size[offset]:
            raise BackendError(f"mapping {size} bytes of a {self._extent_size[offset]}-byte page")
        self._reservations.check(address, size, self.granularity)
        _mmap_checked(address, size, PROT_NONE, MAP_SHARED | MAP_FIXED, self._fd, offset, "map page")

    def set_access(self, address: int, size: int) -> None:
        self._reservations.check(address, size, self.granularity)
        _check(_mprotect(address, size, PROT_READ_WRITE), "mprotect")
        if self.prefault:
            _check(_madvise(address, size, MADV_POPULATE_WRITE), "madvise(MADV_POPULATE_WRITE)")

    def unmap(self, address: int, size: int) -> None:
        self._reservations.check(address, size, self.granularity)
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED
        _mmap_checked(address, size, PROT_NONE, flags, -1, 0, "unmap (PROT_NONE remap)")

    def map_pages(self, address: int, page_size: int, handles: Sequence[object]) -> int:
        size = page_size * len(handles)
        self._reservations.check(address, size, self.granularity)
        offsets = list(handles)  # a CPU page handle is its memfd offset
        for offset in offsets:
            if not isinstance(offset, int) or self._extent_size.get(offset) != page_size:
                raise BackendError(f"{offset!r} is not the handle of a live {page_size}-byte page")
        flags = MAP_SHARED | MAP_FIXED
        calls = 0
        for first, count in _consecutive_runs(offsets, page_size):
            where = address + first * page_size
            _mmap_checked(where, count * page_size, PROT_READ_WRITE, flags, self._fd, offsets[first], "map pages")
            calls += 1
        if self.prefault:
            _check(_madvise(address, size, MADV_POPULATE_WRITE), "madvise(MADV_POPULATE_WRITE)")
        return calls

    def unmap_pages(self, address: int, page_size: int, count: int) -> None:
        self.unmap(address, page_size * count)

    def discard_pages(self, handles: Sequence[object]) -> None:
        offsets = [self._page_offset(handle) for handle in handles]
        sizes = {self._extent_size[offset] for offset in offsets}
        if len(sizes) != 1:  # runs are defined over pages of one size
            super().discard_pages(handles)
            return
        (page_size,) = sizes
        flags = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        for first, count in _consecutive_runs(offsets, page_size):
            _check(_fallocate(self._fd, flags, offsets[first], count * page_size), "fallocate(PUNCH_HOLE)")

    # -- tensors and lifetime ----------------------------------------------------------------------
    def wrap_tensor(self, address: int, size: int) -> torch.Tensor:
        self._reservations.check(address, size, self.granularity)
        tensor, record = tensor_over_memory(address, size, self.device)
        self._records.append(record)
        return tensor

    def committed_bytes(self) -> int:
        """Memory the memfd holds now (what punching holes gives back)."""
        return os.fstat(self._fd).st_blocks * 512

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reservation in self._reservations:
            self.free_reservation(reservation.address, reservation.size)
        os.close(self._fd)

    def _page_offset(self, handle: object) -> int:
        if not isinstance(handle, int) or handle not in self._extent_size:
            raise BackendError(f"unknown physical page handle {handle!r}")
        return handle


def _consecutive_runs(offsets: list[int], page_size: int) -> list[tuple[int, int]]:
    """(first index, length) of each maximal run of offsets that follow one another `page_size` apart."""
    runs: list[tuple[int, int]] = []
    first = 0
    for index in range(1, len(offsets) + 1):
        if index == len(offsets) or offsets[index] != offsets[index - 1] + page_size:
            runs.append((first, index - first))
            first = index
    return runs
