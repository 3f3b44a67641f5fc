"""A torch tensor over raw memory on an explicit device, through a hand-built DLPack capsule.

Why not `torch.frombuffer` or `__cuda_array_interface__`: the latter asks the driver which device a pointer
belongs to, which can fail on a reserved-but-unmapped VMM range; a DLPack capsule states the device outright
and the same code serves host (kDLCPU) and GPU (kDLCUDA) memory, so the CPU tests exercise the GPU path's
wrapper. Building the tensor reads and writes no memory. This module never allocates or frees the memory it
wraps; the caller keeps the returned `DLPackRecord` alive for as long as the tensor lives (torch reads its
deleter field when the tensor dies).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

KDL_CPU = 1
KDL_CUDA = 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))),
]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


@dataclass
class DLPackRecord:
    """The C structures a wrapped tensor points at; must outlive the tensor."""

    managed: _DLManagedTensor
    shape: ctypes.Array


def dlpack_device(device: torch.device) -> tuple[int, int]:
    """(DLPack device type, device id) for a torch device."""
    if device.type == "cpu":
        return KDL_CPU, 0
    if device.type == "cuda":
        return KDL_CUDA, device.index if device.index is not None else torch.cuda.current_device()
    raise ValueError(f"no DLPack mapping for device {device}")


def dlpack_capsule(address: int, size: int, device: torch.device) -> tuple[object, DLPackRecord]:
    """A 'dltensor' capsule describing `size` bytes at `address` as a 1-D uint8 array on `device`."""
    device_type, device_id = dlpack_device(device)
    shape = (ctypes.c_int64 * 1)(size)
    managed = _DLManagedTensor()
    managed.dl_tensor.data = address
    managed.dl_tensor.device = _DLDevice(device_type, device_id)
    managed.dl_tensor.ndim = 1
    managed.dl_tensor.dtype = _DLDataType(_KDL_UINT, 8, 1)
    managed.dl_tensor.shape = shape
    managed.dl_tensor.strides = None  # compact row-major
    managed.dl_tensor.byte_offset = 0
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    return capsule, DLPackRecord(managed=managed, shape=shape)


def tensor_over_memory(address: int, size: int, device: torch.device) -> tuple[torch.Tensor, DLPackRecord]:
    """A uint8 tensor of `size` bytes at `address` on `device`, and the record to keep alive alongside it."""
    capsule, record = dlpack_capsule(address, size, device)
    tensor = torch.from_dlpack(capsule)
    if tensor.data_ptr() != address or tensor.numel() != size:
        raise RuntimeError("DLPack import did not wrap the requested memory in place")
    return tensor, record
