"""The CUDA memory backend: vAttention's VMM calls through cuda-python (`cuda.bindings.driver`).

NOTE: this backend has NOT run on a GPU. It was written against the cuda-python driver bindings' documented
signatures (every call returns a tuple whose first item is a CUresult) and its call sequence is tested on a
CPU with `emulated_driver.EmulatedCudaDriver`, a stand-in for the driver module built on the CPU backend.
Validate it on a device (tests/gpu) before relying on it.

Sequence: torch initialises CUDA first (so the driver calls use torch's primary context), then
cuMemGetAllocationGranularity -> cuMemAddressReserve -> cuMemCreate (the page pool, up front) -> cuMemMap +
cuMemSetAccess as slots grow -> cuMemUnmap when pages move -> cuMemRelease / cuMemAddressFree on close.
Tensors over the reservation are built with an explicit device through DLPack (no pointer-attribute query on
unmapped memory). The driver module is imported lazily, so a CPU-only install never needs cuda-python. Pages
stay physically allocated while in the pool (device memory is the budget); `discard` is therefore a no-op
here.
Kernels run asynchronously: after each step the engine records a CUDA event (record_queued_work) and every
unmap first waits on the latest one (before_unmap), so no range is unmapped under a queued kernel that may
still read it. That ordering has NOT run on a GPU either (as of 2026-11-21); on the CPU its call order is
tested with a stand-in event.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from fusedserve.engine.vattention.backend import BackendError, MemoryBackend, Reservation, ReservationTable
from fusedserve.engine.vattention.dlpack import DLPackRecord, tensor_over_memory


def load_driver() -> ModuleType:
    """cuda-python's driver bindings (pip install 'cuda-python>=12.4', the `gpu` extra)."""
    try:
        return importlib.import_module("cuda.bindings.driver")
    except ImportError as error:  # older cuda-python exposes the same API as cuda.cuda
        try:
            return importlib.import_module("cuda.cuda")
        except ImportError:
            raise ImportError(
                "the CUDA vAttention backend needs cuda-python: pip install 'cuda-python>=12.4'"
            ) from error


class CudaMemoryBackend(MemoryBackend):
    """Device memory through the CUDA VMM API.

    `driver` defaults to cuda-python's `cuda.bindings.driver`; tests pass the emulated driver.
    `tensor_device` is where torch sees the memory: the CUDA device itself (default), or the CPU for the
    emulated driver, whose "device" memory is host memory.
    `work_event`: makes the marker record_queued_work records (anything with .synchronize()); default a CUDA
    event recorded on the current stream when the tensors live on CUDA, none for the emulated driver.
    """

    def __init__(
        self,
        device: torch.device | str | int = 0,
        driver: Any = None,
        tensor_device: torch.device | None = None,
        work_event: Callable[[], Any] | None = None,
    ) -> None:
        if isinstance(device, int):
            device = torch.device("cuda", device)
        device = torch.device(device)
        self.ordinal = device.index if device.index is not None else 0
        self.device = tensor_device if tensor_device is not None else torch.device("cuda", self.ordinal)
        if self.device.type == "cuda":
            # torch creates the device's primary context and makes it current before any VMM call
            torch.cuda.init()
            torch.cuda.set_device(self.ordinal)
            torch.empty(1, device=self.device)
        self.driver = driver if driver is not None else load_driver()
        drv = self.driver
        self._context = self._call("cuCtxGetCurrent")
        self._prop = drv.CUmemAllocationProp()
        self._prop.type = drv.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = self.ordinal
        self._prop.requestedHandleTypes = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
        self._access = drv.CUmemAccessDesc()
        self._access.location.type = drv.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._access.location.id = self.ordinal
        self._access.flags = drv.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        option = drv.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self.granularity = int(self._call("cuMemGetAllocationGranularity", self._prop, option))
        self._reservations = ReservationTable()
        self._page_sizes: dict[int, int] = {}  # id(handle) -> size, for the map size check
        self._live_handles: dict[int, Any] = {}
        self._records: list[DLPackRecord] = []
        self._lock = threading.Lock()
        self._closed = False
        if work_event is None and self.device.type == "cuda":
            work_event = self._record_cuda_event
        self._work_event = work_event
        self._queued_work: Any = None  # the latest marker; read by the map-ahead thread, replaced whole

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.driver, name)(*args)
        error, values = result[0], result[1:]
        if error != self.driver.CUresult.CUDA_SUCCESS:
            raise BackendError(f"{name} failed: {getattr(error, 'name', error)}")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def bind_thread(self) -> None:
        self._call("cuCtxSetCurrent", self._context)

    # -- ordering against queued kernels -----------------------------------------------------------
    def _record_cuda_event(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def record_queued_work(self) -> None:
        if self._work_event is not None:
            self._queued_work = self._work_event()

    def before_unmap(self) -> None:
        marker = self._queued_work
        if marker is not None:
            marker.synchronize()

    # -- virtual ranges ----------------------------------------------------------------------------
    def reserve(self, size: int, alignment: int = 0) -> int:
        alignment = max(alignment, self.granularity)
        if size <= 0 or size % self.granularity or alignment % self.granularity:
            raise BackendError(f"reserve size {size} / alignment {alignment} not multiples of {self.granularity}")
        address = int(self._call("cuMemAddressReserve", size, alignment, 0, 0))
        with self._lock:
            self._reservations.add(Reservation(address, size))
        return address

    def free_reservation(self, address: int, size: int) -> None:
        with self._lock:
            self._reservations.remove(address, size)
        self._call("cuMemAddressFree", address, size)

    # -- physical pages ----------------------------------------------------------------------------
    def create_physical(self, size: int) -> Any:
        if size <= 0 or size % self.granularity:
            raise BackendError(f"page size {size} is not a multiple of the granularity {self.granularity}")
        handle = self._call("cuMemCreate", size, self._prop, 0)
        with self._lock:
            self._page_sizes[id(handle)] = size
            self._live_handles[id(handle)] = handle
        return handle

    def release_physical(self, handle: object) -> None:
        self._page_size(handle)
        self._call("cuMemRelease", handle)
        with self._lock:
            del self._page_sizes[id(handle)], self._live_handles[id(handle)]

    def discard(self, handle: object) -> None:
        self._page_size(handle)  # device pages stay allocated in the pool: the budget is device memory

    # -- mapping -----------------------------------------------------------------------------------
    def map(self, address: int, size: int, handle: object) -> None:
        if size != self._page_size(handle):
            raise BackendError(f"mapping {size} bytes of a {self._page_size(handle)}-byte page")
        self._reservations.check(address, size, self.granularity)
        self._call("cuMemMap", address, size, 0, handle, 0)

    def set_access(self, address: int, size: int) -> None:
        self._reservations.check(address, size, self.granularity)
        self._call("cuMemSetAccess", address, size, [self._access], 1)

    def unmap(self, address: int, size: int) -> None:
        self._reservations.check(address, size, self.granularity)
        self._call("cuMemUnmap", address, size)

    # -- tensors and lifetime ----------------------------------------------------------------------
    def wrap_tensor(self, address: int, size: int) -> torch.Tensor:
        self._reservations.check(address, size, self.granularity)
        tensor, record = tensor_over_memory(address, size, self.device)
        self._records.append(record)
        return tensor

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for reservation in self._reservations:
            self.free_reservation(reservation.address, reservation.size)
        for handle in list(self._live_handles.values()):
            self.release_physical(handle)

    def _page_size(self, handle: object) -> int:
        size = self._page_sizes.get(id(handle))
        if size is None or self._live_handles.get(id(handle)) is not handle:
            raise BackendError(f"unknown physical page handle {handle!r}")
        return size
