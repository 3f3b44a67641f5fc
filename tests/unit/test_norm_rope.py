"""The per-block small ops (RMSNorm, residual add + norm, rotary + KV store, SiLU product): the C++ kernels equal the
torch reference expressions, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from fusedserve.kernels.attention import SlotBatch, rope_and_store_kv, write_kv
from fusedserve.kernels.cpu.extensions import load_cpp_extension
from fusedserve.kernels.norm_rope import CPP_SOURCE, add_rms_norm, apply_rope, rms_norm, silu_mul

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


@needs_cpp
@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_updates_the_residual_in_place_and_returns_its_norm(
    delta_dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 96, generator=gen) * 2
    delta = torch.randn(3, 96, generator=gen).to(delta_dtype)
    weight = torch.rand(96, generator=gen) + 0.5
    expected_hidden = hidden.double() + delta.double()
    residual = hidden.clone()
    got = add_rms_norm(residual, delta, weight, 1e-5, out_dtype)
    torch.testing.assert_close(residual.double(), expected_hidden, rtol=1e-6, atol=1e-6)
    assert got.dtype == out_dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if out_dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-6}
    torch.testing.assert_close(got.double(), reference_norm(expected_hidden, weight, 1e-5), **tolerance)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_equals_silu_of_the_gate_times_the_up_half(dtype: torch.dtype) -> None:
    gate_up = (torch.randn(4, 2 * 48, generator=torch.Generator().manual_seed(3)) * 4).to(dtype)
    gate, up = gate_up.double().chunk(2, dim=-1)
    got = silu_mul(gate_up)
    assert got.dtype == dtype and got.shape == (4, 48)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-3}
    torch.testing.assert_close(got.double(), gate * torch.sigmoid(gate) * up, **tolerance)


@needs_cpp
@pytest.mark.parametrize("qkv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_rope_and_store_kv_equals_split_rope_and_indexed_write_on_strided_caches(
    qkv_dtype: torch.dtype, cache_dtype: torch.dtype
) -> None:
    """Two sequences (a 3-token chunk in slot 2, one token in slot 0) into caches that are views with a slot
    stride larger than their rows, like a vAttention cache's."""
    gen = torch.Generator().manual_seed(4)
    heads, kv_heads, dim = 3, 1, 16
    batch = SlotBatch.build([2, 0], [3, 1], [5, 9])
    tokens = batch.num_tokens
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).to(qkv_dtype)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def caches() -> tuple[torch.Tensor, torch.Tensor]:
        backing = torch.zeros(2, 4, 12, kv_heads, dim, dtype=cache_dtype)
        return backing[0, :, :10], backing[1, :, :10]  # [4 slots, 10 positions, kv_heads, dim], slot stride 12 rows

    keys, values = caches()
    q = rope_and_store_kv(qkv, cos, sin, keys, values, batch, heads, kv_heads)
    want_keys, want_values = caches()
    q_ref, k_ref, v_ref = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = apply_rope(q_ref.view(tokens, heads, dim), cos, sin)
    write_kv(want_keys, want_values, apply_rope(k_ref.view(tokens, kv_heads, dim), cos, sin),
             v_ref.view(tokens, kv_heads, dim), batch)
    assert q.dtype == qkv_dtype and q.shape == (tokens, heads, dim)
    torch.testing.assert_close(q, want_q)
    # A bf16 k rotated into an fp32 cache is rounded once by the kernel, twice by the reference: bf16 tolerance.
    rounded_once = {"rtol": 2**-8, "atol": 1e-6} if qkv_dtype == torch.bfloat16 else {}
    torch.testing.assert_close(keys, want_keys, **rounded_once)
    torch.testing.assert_close(values, want_values)
    assert keys[2, 2:5].abs().sum() > 0 and keys[0, 8].abs().sum() > 0 and keys[1].abs().sum() == 0


@needs_cpp
def test_rope_and_store_kv_refuses_a_position_outside_the_cache() -> None:
    keys, values = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    batch = SlotBatch.build([1], [1], [5])  # position 4 of a 4-position cache
    with pytest.raises(RuntimeError, match="outside the cache"):
        rope_and_store_kv(torch.randn(1, 3 * 8), torch.ones(1, 8), torch.zeros(1, 8), keys, values, batch, 1, 1)
    assert keys.abs().sum() == 0


def test_torch_fallbacks_of_the_fused_ops_on_float64() -> None:
    hidden, delta = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)
    expected = hidden + delta
    normed = add_rms_norm(hidden, delta, None, 1e-6, torch.float64)
    torch.testing.assert_close(hidden, expected)
    torch.testing.assert_close(normed, reference_norm(expected, None, 1e-6))
    gate_up = torch.randn(2, 8, dtype=torch.float64)
    torch.testing.assert_close(silu_mul(gate_up), torch.nn.functional.silu(gate_up[:, :4]) * gate_up[:, 4:])
