"""A stand-in for cuda-python's `cuda.bindings.driver`, covering the VMM calls CudaMemoryBackend makes.

It is built on the CPU backend, so "device" memory is host memory that really gets reserved, mapped and
unmapped, and it checks what the CUDA driver documents: sizes and addresses are multiples of the granularity,
maps land only on reserved, not-yet-mapped ranges, set-access and unmap cover whole mappings, an address range
is freed only when nothing is mapped in it, and a context is current on the calling thread. Every call is
recorded in `calls` so tests can pin down the sequence. Functions return tuples led by a CUresult, as
cuda-python's do.

It exists so the CUDA backend's logic runs in CPU tests; it must never be used to serve (it is not a GPU).
"""

from __future__ import annotations

import bisect
import enum
import threading
from dataclasses import dataclass, field
from typing import Any

from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_OUT_OF_MEMORY = 2
    CUDA_ERROR_INVALID_CONTEXT = 201
    CUDA_ERROR_ALREADY_MAPPED = 208
    CUDA_ERROR_NOT_MAPPED = 211
    CUDA_ERROR_INVALID_HANDLE = 400


class CUmemAllocationType(enum.IntEnum):
    CU_MEM_ALLOCATION_TYPE_INVALID = 0
    CU_MEM_ALLOCATION_TYPE_PINNED = 1


class CUmemLocationType(enum.IntEnum):
    CU_MEM_LOCATION_TYPE_INVALID = 0
    CU_MEM_LOCATION_TYPE_DEVICE = 1


class CUmemAllocationHandleType(enum.IntEnum):
    CU_MEM_HANDLE_TYPE_NONE = 0


class CUmemAccess_flags(enum.IntEnum):  # noqa: N801 - cuda-python's spelling
    CU_MEM_ACCESS_FLAGS_PROT_NONE = 0
    CU_MEM_ACCESS_FLAGS_PROT_READ = 1
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class CUmemAllocationGranularity_flags(enum.IntEnum):  # noqa: N801 - cuda-python's spelling
    CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1


@dataclass
class CUmemLocation:
    type: CUmemLocationType = CUmemLocationType.CU_MEM_LOCATION_TYPE_INVALID
    id: int = 0


@dataclass
class CUmemAllocationProp:
    type: CUmemAllocationType = CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_INVALID
    location: CUmemLocation = field(default_factory=CUmemLocation)
    requestedHandleTypes: CUmemAllocationHandleType = CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE  # noqa: N815


@dataclass
class CUmemAccessDesc:
    location: CUmemLocation = field(default_factory=CUmemLocation)
    flags: CUmemAccess_flags = CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_NONE


@dataclass(eq=False)
class CUmemGenericAllocationHandle:
    offset: int  # extent of the CPU backend's memfd
    size: int
    released: bool = False


@dataclass(frozen=True)
class CUcontext:
    device: int


class EmulatedCudaDriver:
    """One emulated device with `memory_bytes` of memory and the given allocation granularity."""

    CUresult = CUresult
    CUmemAllocationType = CUmemAllocationType
    CUmemLocationType = CUmemLocationType
    CUmemAllocationHandleType = CUmemAllocationHandleType
    CUmemAccess_flags = CUmemAccess_flags
    CUmemAllocationGranularity_flags = CUmemAllocationGranularity_flags
    CUmemAllocationProp = CUmemAllocationProp
    CUmemAccessDesc = CUmemAccessDesc

    def __init__(self, granularity: int = 2 * 1024 * 1024, memory_bytes: int = 1 << 30, device: int = 0) -> None:
        self.host = CpuMemoryBackend(prefault=False, name="emulated-cuda")
        if granularity % self.host.granularity:
            raise ValueError("the emulated granularity must be a multiple of the host page size")
        self.granularity = granularity
        self.memory_bytes = memory_bytes
        self.allocated_bytes = 0
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self._context = CUcontext(device)
        self._current = threading.local()
        self._current.context = self._context  # as if torch had made the primary context current here
        self._reservations: dict[int, int] = {}  # address -> size
        self._map_starts: list[int] = []
        self._mappings: dict[int, tuple[int, CUmemGenericAllocationHandle]] = {}  # address -> (size, handle)
        self._lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------------------
    def _record(self, name: str, *args: Any) -> CUresult | None:
        with self._lock:
            self.calls.append((name, args))
        if name not in ("cuCtxSetCurrent", "cuCtxGetCurrent") and getattr(self._current, "context", None) is None:
            return CUresult.CUDA_ERROR_INVALID_CONTEXT
        return None

    def _aligned(self, *values: int) -> bool:
        return all(v % self.granularity == 0 for v in values)

    def _reserved(self, address: int, size: int) -> bool:
        return any(start <= address and address + size <= start + n for start, n in self._reservations.items())

    def _mappings_in(self, address: int, size: int) -> list[int]:
        index = bisect.bisect_left(self._map_starts, address)
        found = []
        while index < len(self._map_starts) and self._map_starts[index] < address + size:
            found.append(self._map_starts[index])
            index += 1
        before = index - len(found) - 1
        if before >= 0:
            start = self._map_starts[before]
            if start + self._mappings[start][0] > address:
                found.insert(0, start)
        return found

    def _covers_whole_mappings(self, address: int, size: int) -> list[int] | None:
        starts = self._mappings_in(address, size)
        position = address
        for start in starts:
            if start != position:
                return None
            position += self._mappings[start][0]
        return starts if position == address + size else None

    # -- contexts ------------------------------------------------------------------------------------
    def cuCtxGetCurrent(self) -> tuple[CUresult, CUcontext | None]:  # noqa: N802
        self._record("cuCtxGetCurrent")
        return CUresult.CUDA_SUCCESS, getattr(self._current, "context", None)

    def cuCtxSetCurrent(self, context: CUcontext) -> tuple[CUresult]:  # noqa: N802
        self._record("cuCtxSetCurrent", context)
        self._current.context = context
        return (CUresult.CUDA_SUCCESS,)

    # -- the VMM calls ---------------------------------------------------------------------------------
    def cuMemGetAllocationGranularity(self, prop: CUmemAllocationProp, option: Any) -> tuple[CUresult, int]:  # noqa: N802
        error = self._record("cuMemGetAllocationGranularity", prop, option)
        return (error, 0) if error else (CUresult.CUDA_SUCCESS, self.granularity)

    def cuMemAddressReserve(self, size: int, alignment: int, addr: int, flags: int) -> tuple[CUresult, int]:  # noqa: N802
        error = self._record("cuMemAddressReserve", size, alignment, addr, flags)
        if error or size <= 0 or not self._aligned(size, alignment) or flags:
            return error or CUresult.CUDA_ERROR_INVALID_VALUE, 0
        address = self.host.reserve(size, max(alignment, self.granularity))
        self._reservations[address] = size
        return CUresult.CUDA_SUCCESS, address

    def cuMemAddressFree(self, ptr: int, size: int) -> tuple[CUresult]:  # noqa: N802
        error = self._record("cuMemAddressFree", ptr, size)
        if error or self._reservations.get(ptr) != size or self._mappings_in(ptr, size):
            return (error or CUresult.CUDA_ERROR_INVALID_VALUE,)
        del self._reservations[ptr]
        self.host.free_reservation(ptr, size)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemCreate(self, size: int, prop: CUmemAllocationProp, flags: int) -> tuple[CUresult, Any]:  # noqa: N802
        error = self._record("cuMemCreate", size, prop, flags)
        pinned_on_device = (
            prop.type == CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
            and prop.location.type == CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        )
        if error or size <= 0 or not self._aligned(size) or flags or not pinned_on_device:
            return error or CUresult.CUDA_ERROR_INVALID_VALUE, None
        if self.allocated_bytes + size > self.memory_bytes:
            return CUresult.CUDA_ERROR_OUT_OF_MEMORY, None
        self.allocated_bytes += size
        return CUresult.CUDA_SUCCESS, CUmemGenericAllocationHandle(self.host.create_physical(size), size)

    def cuMemRelease(self, handle: CUmemGenericAllocationHandle) -> tuple[CUresult]:  # noqa: N802
        error = self._record("cuMemRelease", handle)
        if error or not isinstance(handle, CUmemGenericAllocationHandle) or handle.released:
            return (error or CUresult.CUDA_ERROR_INVALID_HANDLE,)
        handle.released = True
        if not any(h is handle for _, h in self._mappings.values()):  # mapped memory lives until unmapped
            self._free(handle)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemMap(self, ptr: int, size: int, offset: int, handle: Any, flags: int) -> tuple[CUresult]:  # noqa: N802
        error = self._record("cuMemMap", ptr, size, offset, handle, flags)
        if error:
            return (error,)
        if not isinstance(handle, CUmemGenericAllocationHandle) or handle.released:
            return (CUresult.CUDA_ERROR_INVALID_HANDLE,)
        if offset or flags or size != handle.size or not self._aligned(ptr, size) or not self._reserved(ptr, size):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        if self._mappings_in(ptr, size):
            return (CUresult.CUDA_ERROR_ALREADY_MAPPED,)
        self.host.map(ptr, size, handle.offset)
        with self._lock:
            bisect.insort(self._map_starts, ptr)
            self._mappings[ptr] = (size, handle)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemSetAccess(self, ptr: int, size: int, descs: list[CUmemAccessDesc], count: int) -> tuple[CUresult]:  # noqa: N802
        error = self._record("cuMemSetAccess", ptr, size, descs, count)
        if error or count != len(descs) or not descs:
            return (error or CUresult.CUDA_ERROR_INVALID_VALUE,)
        if any(d.flags != CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE for d in descs):
            return (CUresult.CUDA_ERROR_INVALID_VALUE,)
        if self._covers_whole_mappings(ptr, size) is None:
            return (CUresult.CUDA_ERROR_NOT_MAPPED,)
        self.host.set_access(ptr, size)
        return (CUresult.CUDA_SUCCESS,)

    def cuMemUnmap(self, ptr: int, size: int) -> tuple[CUresult]:  # noqa: N802
        error = self._record("cuMemUnmap", ptr, size)
        if error:
            return (error,)
        starts = self._covers_whole_mappings(ptr, size)
        if starts is None:
            return (CUresult.CUDA_ERROR_NOT_MAPPED,)
        self.host.unmap(ptr, size)
        with self._lock:
            for start in starts:
                _, handle = self._mappings.pop(start)
                self._map_starts.remove(start)
                if handle.released:
                    self._free(handle)
        return (CUresult.CUDA_SUCCESS,)

    def _free(self, handle: CUmemGenericAllocationHandle) -> None:
        self.host.release_physical(handle.offset)
        self.allocated_bytes -= handle.size

    def call_names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def close(self) -> None:
        self.host.close()
