"""RMSNorm, rotary embeddings and the other small per-block ops as the model calls them: one C++ call each on the
CPU, torch elsewhere.

The C++ kernels (kernels/cpu/norm_rope.cpp) compute in fp32 and round a bf16 result once; the torch expressions
are the reference and serve other devices, other dtypes and hosts without a compiler.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedserve.kernels.cpu.extensions import load_cpp_extension

CPP_SOURCE = "norm_rope.cpp"
_CPP_DTYPES = (torch.float32, torch.bfloat16)


def _kernel(x: torch.Tensor):
    return load_cpp_extension(CPP_SOURCE) if x.device.type == "cpu" and x.dtype in _CPP_DTYPES else None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x / rms(x) (* weight) over the last dimension of x [T, d], returned in `dtype` (default: x's)."""
    dtype = dtype or x.dtype
    kernel = _kernel(x)
    if kernel is not None and x.dim() == 2 and dtype in _CPP_DTYPES:
        return kernel.rms_norm(x, weight, eps, dtype == torch.bfloat16)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (normed if weight is None else normed * weight).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, dim] rotated by position: x * cos + rotate_half(x) * sin, with cos and sin [T, dim]."""
    kernel = _kernel(x)
    if kernel is not None and x.stride(-1) == 1 and x.stride(1) == x.shape[2]:
        return kernel.apply_rope(x, cos, sin)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def add_rms_norm(
    hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor | None, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """hidden += delta in place (hidden: the fp32 residual stream [T, d], owned by the caller), then
    rms_norm(hidden, weight) in `dtype`: the residual add and the next norm in one pass."""
    kernel = _kernel(hidden)
    if kernel is not None and hidden.dtype == torch.float32 and hidden.is_contiguous() and dtype in _CPP_DTYPES:
        if delta.dtype in _CPP_DTYPES and delta.shape == hidden.shape:
            return kernel.add_rms_norm(hidden, delta, weight, eps, dtype == torch.bfloat16)
    hidden += delta
    return rms_norm(hidden, weight, eps, dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate and up stacked along the last dimension ([T, 2 * inter] -> [T, inter])."""
    kernel = _kernel(gate_up)
    if kernel is not None and gate_up.dim() == 2:
        return kernel.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
