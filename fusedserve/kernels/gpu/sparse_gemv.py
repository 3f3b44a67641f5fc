"""LaRoSA/TEAL top-k sparse GEMV on CUDA: a Triton kernel that reads only the kept input channels' weight rows.

NOT YET RUN ON A GPU (as of 2026-11-21). The kernel was checked on the CPU with Triton's interpreter
(TRITON_INTERPRET=1, tests/unit/test_gpu_planning.py, skipped where triton is not installed) against the dense
reference; tests/gpu/test_sparse_gemv_cuda.py checks it on a device. The dispatch thresholds below are NOT
measured yet: measure them with benchmarks on a GPU before trusting the speed side (the values never change
results, only which path computes them).

y[r] = sum over the k largest-|x[r]| channels i of x[r, i] * W^T[i, :] (+ b). Each program owns one token row
and BLOCK_N output columns; it walks the row's kept channels BLOCK_K at a time, loading those rows of the
input-major weight W^T [in, out] (each a contiguous run of BLOCK_N elements), and accumulates in fp32. The work
and the weight traffic grow with rows * k, so the kernel serves small batches; larger ones are cheaper as one
dense cuBLAS GEMM of the masked input (`use_sparse_gemv` decides, kernels/sparse_linear.py dispatches).
Triton is imported on first use, so CPU-only installs never need it. This module never changes weights.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

SPARSE_GEMV_MAX_ROWS = 8  # unmeasured: above this many tokens the dense GEMM's weight reuse wins
SPARSE_GEMV_MAX_READ_FRACTION = 0.5  # unmeasured: rows * k at most this share of the inputs (weight bytes read)
BLOCK_N = 64  # output columns per program: 128 contiguous bytes of a bf16 weight row
BLOCK_K = 32  # kept channels loaded per iteration


def use_sparse_gemv(rows: int, k: int, in_features: int) -> bool:
    """Whether the Triton kernel (rows * k weight rows read) should beat dense cuBLAS (all in_features rows)."""
    return 0 < rows <= SPARSE_GEMV_MAX_ROWS and rows * k <= SPARSE_GEMV_MAX_READ_FRACTION * in_features


@functools.cache
def _kernel() -> Any:
    """Compile-on-first-use Triton kernel (imported lazily: CPU-only installs need no triton)."""
    import triton
    import triton.language as tl

    @triton.jit
    def topk_sparse_gemv_kernel(
        x_ptr,
        index_ptr,
        weight_t_ptr,
        bias_ptr,
        out_ptr,
        k,
        out_features,
        stride_x,
        stride_index,
        stride_weight_t,
        stride_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, k, BLOCK_K):
            offsets = start + tl.arange(0, BLOCK_K)
            kept = offsets < k
            channels = tl.load(index_ptr + row * stride_index + offsets, mask=kept, other=0)
            values = tl.load(x_ptr + row * stride_x + channels, mask=kept, other=0.0).to(tl.float32)
            weights = tl.load(
                weight_t_ptr + channels[:, None] * stride_weight_t + cols[None, :],
                mask=kept[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(weights.to(tl.float32) * values[:, None], axis=0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

    return topk_sparse_gemv_kernel, triton.cdiv


def topk_sparse_gemv(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """TopK_k(x) @ W^T + b for x [rows, in] and the input-major weight W^T [in, out] (contiguous); out [rows, out]."""
    rows, in_features = x.shape
    if weight_t.shape[0] != in_features or weight_t.stride(1) != 1:
        raise ValueError(f"weight_t must be a row-major [in={in_features}, out] matrix, got {tuple(weight_t.shape)}")
    out_features = weight_t.shape[1]
    x = x.contiguous()
    index = x.abs().topk(k, dim=-1, sorted=False).indices.contiguous()
    out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    kernel, cdiv = _kernel()
    kernel[(rows, cdiv(out_features, BLOCK_N))](
        x,
        index,
        weight_t,
        bias if bias is not None else x,  # a valid pointer the kernel never reads when HAS_BIAS is False
        out,
        k,
        out_features,
        x.stride(0),
        index.stride(0),
        weight_t.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_K=BLOCK_K,
        BLOCK_N=BLOCK_N,
    )
    return out
