"""RMSNorm and rotary embeddings as the model calls them: one C++ call each on the CPU, torch elsewhere.

The C++ kernels (kernels/cpu/norm_rope.cpp) compute in fp32 and round a bf16 result once; the torch expressions
are the reference and serve other devices, other dtypes and hosts without a compiler.
"""

from __future__ import annotations

import torch

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
