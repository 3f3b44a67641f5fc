"""RMSNorm and rotary embeddings: the C++ kernels equal the torch reference expressions, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from fusedserve.kernels.cpu.extensions import load_cpp_extension
from fusedserve.kernels.norm_rope import CPP_SOURCE, apply_rope, rms_norm

needs_cpp = pytest.mark.skipif(load_cpp_extension(CPP_SOURCE) is None, reason="C++ extension unavailable")


def reference_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed if weight is None else normed * weight.double()


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x.double()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.double()[:, None] + rotated * sin.double()[:, None]


@needs_cpp
@pytest.mark.parametrize("tokens", [1, 3, 40])
@pytest.mark.parametrize("with_weight", [True, False])
def test_cpp_rms_norm_equals_reference_in_fp32_and_rounds_bf16_once(tokens: int, with_weight: bool) -> None:
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=gen) * 3
    weight = torch.rand(96, generator=gen) + 0.5 if with_weight else None
    expected = reference_norm(x, weight, 1e-5)
    kernel = load_cpp_extension(CPP_SOURCE)
    fp32 = kernel.rms_norm(x, weight, 1e-5, False)
    assert fp32.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), expected, rtol=1e-5, atol=1e-6)
    bf16 = rms_norm(x, weight, 1e-5, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    # One rounding of the fp32 value: within half a bf16 ulp of the exact result (plus fp32 noise).
    torch.testing.assert_close(bf16.double(), expected, rtol=2**-8, atol=1e-6)
    # A bf16 residual is widened first: same statistics as its fp32 values.
    widened = kernel.rms_norm(x.bfloat16().float(), weight, 1e-5, False)
    torch.testing.assert_close(kernel.rms_norm(x.bfloat16(), weight, 1e-5, False), widened)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_rope_equals_reference_on_a_column_slice_of_a_fused_projection(dtype: torch.dtype) -> None:
    """q and k arrive as column slices of the fused qkv output (strided rows); the result is packed."""
    gen = torch.Generator().manual_seed(1)
    tokens, heads, kv_heads, dim = 5, 3, 1, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for part, count in ((q, heads), (k, kv_heads)):
        x = part.view(tokens, count, dim)
        got = apply_rope(x, cos, sin)
        assert got.dtype == dtype and got.is_contiguous() and got.shape == (tokens, count, dim)
        tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-6}
        torch.testing.assert_close(got.double(), reference_rope(x, cos, sin), **tolerance)


def test_torch_fallback_matches_the_reference_on_other_dtypes() -> None:
    """float64 has no C++ kernel: the torch expressions serve it (and any non-CPU device)."""
    x = torch.randn(4, 2, 8, dtype=torch.float64)
    cos, sin = torch.rand(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin), reference_rope(x, cos, sin))
    flat = x.view(4, 16)
    torch.testing.assert_close(rms_norm(flat, None, 1e-6), reference_norm(flat, None, 1e-6))
