"""The memory-backend interface of vAttention, in the shape of the CUDA virtual memory management (VMM) API.

reserve a virtual range -> create physical pages -> map a page at an address -> set access -> (use) -> unmap
-> release. The allocator (allocator.py) speaks only this interface; the CPU backend implements it with mmap
and a memfd, the CUDA backend with cuda-python. The *_pages calls work on a run of consecutive addresses: by
default one call per page (CUDA maps each page handle on its own), while the CPU backend covers each run of
physically consecutive pages with one system call. A backend never decides which page goes where (the allocator
does) and never maps outside a range it reserved: every map/unmap/set_access is bounds- and alignment-checked
here, because a stray fixed mapping silently overwrites whatever lives at that address.
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# An opaque handle to one physical page: an offset into a memfd, a CUmemGenericAllocationHandle.
PhysicalHandle = object


class BackendError(RuntimeError):
    """A call was refused (out of range, misaligned, unknown handle) or the OS/driver reported a failure."""


@dataclass(frozen=True)
class Reservation:
    address: int
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size


class ReservationTable:
    """The virtual ranges a backend reserved, to check that every map stays inside one of them."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._by_start: dict[int, Reservation] = {}

    def add(self, reservation: Reservation) -> None:
        index = bisect.bisect_left(self._starts, reservation.address)
        if self._overlaps(index, reservation):
            raise BackendError(f"reservation {reservation} overlaps an existing one")
        self._starts.insert(index, reservation.address)
        self._by_start[reservation.address] = reservation

    def remove(self, address: int, size: int) -> None:
        reservation = self._by_start.get(address)
        if reservation is None or reservation.size != size:
            raise BackendError(f"no reservation of {size} bytes at {address:#x}")
        del self._by_start[address]
        self._starts.remove(address)

    def check(self, address: int, size: int, alignment: int) -> Reservation:
        """The reservation holding [address, address + size); raises unless inside one and aligned."""
        if size <= 0 or address % alignment or size % alignment:
            raise BackendError(f"range {address:#x}+{size} is empty or not aligned to {alignment}")
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0:
            raise BackendError(f"range {address:#x}+{size} is outside every reservation")
        reservation = self._by_start[self._starts[index]]
        if address + size > reservation.end:
            raise BackendError(f"range {address:#x}+{size} runs past reservation ending at {reservation.end:#x}")
        return reservation

    def __iter__(self):
        return iter(list(self._by_start.values()))

    def _overlaps(self, index: int, reservation: Reservation) -> bool:
        if index > 0 and self._by_start[self._starts[index - 1]].end > reservation.address:
            return True
        return index < len(self._starts) and self._starts[index] < reservation.end


class MemoryBackend(ABC):
    """Virtual reservations and physical pages of one device; all sizes are multiples of `granularity`."""

    granularity: int  # the smallest page size / alignment the device supports
    device: torch.device  # where tensors over this memory live

    @abstractmethod
    def reserve(self, size: int, alignment: int = 0) -> int:
        """Reserve `size` bytes of virtual address space with nothing behind it; returns the start address."""

    @abstractmethod
    def free_reservation(self, address: int, size: int) -> None:
        """Give a whole reservation back. Nothing may be mapped in it and no tensor over it used again."""

    @abstractmethod
    def create_physical(self, size: int) -> PhysicalHandle:
        """A new physical page of `size` bytes (cuMemCreate)."""

    @abstractmethod
    def release_physical(self, handle: PhysicalHandle) -> None:
        """Destroy a physical page (cuMemRelease); it must not be mapped anywhere."""

    @abstractmethod
    def map(self, address: int, size: int, handle: PhysicalHandle) -> None:
        """Back [address, address + size) of a reservation with the page (cuMemMap); not yet accessible."""

    @abstractmethod
    def set_access(self, address: int, size: int) -> None:
        """Make a mapped range readable and writable (cuMemSetAccess); may span several consecutive pages."""

    @abstractmethod
    def unmap(self, address: int, size: int) -> None:
        """Remove the pages behind the range (cuMemUnmap); the reservation stays, the pages keep data."""

    @abstractmethod
    def discard(self, handle: PhysicalHandle) -> None:
        """Let the OS take the page's memory back while the handle stays valid (its contents become zeros)."""

    def map_pages(self, address: int, page_size: int, handles: Sequence[PhysicalHandle]) -> int:
        """Back [address, address + len(handles) * page_size) with these pages in order and make it readable and
        writable: map each page, then set access once over the range. Returns the map calls it took."""
        for index, handle in enumerate(handles):
            self.map(address + index * page_size, page_size, handle)
        self.set_access(address, page_size * len(handles))
        return len(handles)

    def unmap_pages(self, address: int, page_size: int, count: int) -> None:
        """Unmap `count` consecutive pages starting at `address` (by default one unmap per page)."""
        for index in range(count):
            self.unmap(address + index * page_size, page_size)

    def discard_pages(self, handles: Sequence[PhysicalHandle]) -> None:
        """Discard each of these pages (see discard)."""
        for handle in handles:
            self.discard(handle)

    @abstractmethod
    def wrap_tensor(self, address: int, size: int) -> torch.Tensor:
        """A uint8 tensor over [address, address + size) that stays valid across remaps. Touches no memory."""

    def bind_thread(self) -> None:  # noqa: B027 - only devices with per-thread contexts need it
        """Prepare the calling thread for backend calls (CUDA: make the context current). Idempotent."""

    def record_queued_work(self) -> None:  # noqa: B027 - only asynchronous devices need it
        """Mark the device work queued so far (CUDA: record an event on the current stream); the CPU runs
        synchronously and has nothing to mark."""

    def before_unmap(self) -> None:  # noqa: B027 - only asynchronous devices need it
        """Block until the work marked by the last record_queued_work has finished, so that no queued kernel
        can still read a range about to be unmapped. The allocator calls it before every unmap."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend itself holds (files, reservations left); tensors over it die."""
