"""The dense linear's per-row-count kernels: the bf16 row walk up to 4 tokens, oneDNN bf16 above, fp32 where asked."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch
from adaptivocab_helpers import write_tiny_model

import fusedserve.kernels.linear as linear_module
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import dense_linear_factory, load_llama, mixed_precision_linear_factory
from fusedserve.kernels.attention import SlotBatch
from fusedserve.kernels.linear import FP32_GEMM_MIN_ROWS_WITHOUT_AMX, ROW_WALK_MAX_ROWS, DenseLinear, ResidualAdapter
from fusedserve.kernels.sparse_linear import load_sparse_linear_extension

ThreadsAt = Callable[[int], AbstractContextManager[None]]  # the torch_threads fixture (tests/conftest.py)
needs_cpp = pytest.mark.skipif(load_sparse_linear_extension() is None, reason="C++ extension unavailable")


def weights(out_features: int = 192, in_features: int = 160) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_small_steps_walk_bf16_rows_with_fp32_sums(
    dtype: torch.dtype, tokens: int, threads: int, torch_threads: ThreadsAt
) -> None:
    weight, bias = weights()
    layer = DenseLinear(weight, bias)
    assert layer.bf16_rows is not None and layer.bf16_rows.shape == (160, 192) and ROW_WALK_MAX_ROWS == 4
    x = torch.randn(tokens, 160).to(dtype)
    with torch_threads(threads):
        got = layer(x)
    assert got.dtype == dtype and got.shape == (tokens, 192)
    # Exactly the product with bf16-rounded weights (x as given), summed in fp32, then rounded to x's dtype.
    expected = (x.double() @ weight.bfloat16().double().T + bias.double()).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-2}
    torch.testing.assert_close(got, expected, **tolerance)


@needs_cpp
def test_row_walk_changes_only_weight_rounding_against_onednn_above_its_row_limit() -> None:
    """Small steps (row walk) and a batch past ROW_WALK_MAX_ROWS (oneDNN bf16) agree to bf16 rounding."""
    weight, bias = weights()
    layer = DenseLinear(weight, bias)
    x = torch.randn(ROW_WALK_MAX_ROWS + 1, 160)
    # Outputs reach ~50 here; oneDNN also rounds x to bf16, so allow a few bf16 ulps of the output scale.
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1], rtol=2e-2, atol=0.3)
    torch.testing.assert_close(layer(x[:ROW_WALK_MAX_ROWS]), layer(x)[:ROW_WALK_MAX_ROWS], rtol=2e-2, atol=0.3)


def test_fp32_layers_and_odd_widths_keep_no_row_copy() -> None:
    weight, bias = weights()
    exact = DenseLinear(weight, bias, bf16_min_rows=None)  # fp32 throughout (calibration, quality runs)
    assert exact.bf16_rows is None
    x = torch.randn(1, 160)
    torch.testing.assert_close(exact(x), x @ weight.T + bias)
    odd = DenseLinear(torch.randn(100, 160))  # 100 output columns: not whole 64-column tiles, oneDNN serves
    assert odd.bf16_rows is None and odd(x).shape == (1, 100)


@needs_cpp
def test_residual_adapter_rounds_its_weights_to_bf16_only_for_small_steps() -> None:
    """The residual stream stays fp32 either way; small steps use a bf16 copy of A (fp32 sums), larger ones A."""
    gen = torch.Generator().manual_seed(5)
    matrix = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))[0].float()
    hidden = torch.randn(ROW_WALK_MAX_ROWS + 1, 128, generator=gen) * 4
    adapter = ResidualAdapter(matrix, bf16_small_steps=True)
    small = adapter(hidden[:1])
    assert small.dtype == torch.float32
    torch.testing.assert_close(small.double(), hidden[:1].double() @ matrix.bfloat16().double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(adapter(hidden), hidden @ matrix)  # past ROW_WALK_MAX_ROWS: the exact fp32 product
    exact = ResidualAdapter(matrix, bf16_small_steps=False)
    torch.testing.assert_close(exact(hidden[:1]), hidden[:1] @ matrix)


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3, ROW_WALK_MAX_ROWS + 2])
def test_residual_adapter_adds_the_pending_block_output_first(rows: int) -> None:
    """adapter(hidden, delta) = (hidden + delta) @ A on both paths, with fp32 and bf16 deltas, and hidden unchanged."""
    gen = torch.Generator().manual_seed(6)
    matrix = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))[0].float()
    hidden = torch.randn(rows, 128, generator=gen) * 4
    before = hidden.clone()
    walked = rows <= ROW_WALK_MAX_ROWS
    weights = matrix.bfloat16().double() if walked else matrix.double()
    adapter = ResidualAdapter(matrix, bf16_small_steps=True)
    for delta in (torch.randn(rows, 128, generator=gen), torch.randn(rows, 128, generator=gen).bfloat16()):
        expected = (hidden.double() + delta.double()) @ weights
        torch.testing.assert_close(adapter(hidden, delta).double(), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(hidden, before)


@needs_cpp
def test_row_walk_refuses_an_addend_of_another_shape() -> None:
    walk = load_sparse_linear_extension()
    w_rows = torch.randn(128, 64).bfloat16()
    with pytest.raises(RuntimeError, match="addend"):
        walk.rows_linear(torch.randn(2, 128), w_rows, None, torch.randn(1, 128))


@needs_cpp
@pytest.mark.parametrize("rows", [1, ROW_WALK_MAX_ROWS, ROW_WALK_MAX_ROWS + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_adapter_enter_returns_the_new_residual_and_its_norm(rows: int, dtype: torch.dtype) -> None:
    """enter() = (hidden + delta) @ A and rms_norm of it (with a scale) in `dtype`, on the fused and the plain path."""
    from fusedserve.kernels.norm_rope import rms_norm

    gen = torch.Generator().manual_seed(7)
    matrix = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))[0].float()
    hidden, delta = torch.randn(rows, 128, generator=gen) * 3, torch.randn(rows, 128, generator=gen)
    scale = torch.rand(128, generator=gen) + 0.5
    adapter = ResidualAdapter(matrix, bf16_small_steps=True)
    entered, normed = adapter.enter(hidden, delta, scale, 1e-5, dtype)
    torch.testing.assert_close(entered, adapter(hidden, delta))
    assert entered.dtype == torch.float32 and normed.dtype == dtype
    torch.testing.assert_close(normed, rms_norm(entered, scale, 1e-5, dtype))


@pytest.mark.parametrize("amx", [True, False])
def test_large_calls_multiply_fp32_weights_only_on_hosts_without_amx(
    amx: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without AMX a call of FP32_GEMM_MIN_ROWS_WITHOUT_AMX rows or more is the exact fp32 product (bf16 in, bf16
    out); with AMX it is oneDNN's bf16 product, which rounds the weights."""
    monkeypatch.setattr(linear_module, "amx_available", lambda: amx)
    weight, bias = weights()
    layer = DenseLinear(weight, bias)
    x = torch.randn(FP32_GEMM_MIN_ROWS_WITHOUT_AMX, 160)
    fp32 = x @ weight.T + bias
    error = (layer(x) - fp32).abs().max().item()
    assert error < 1e-3 if not amx else error > 1e-2  # outputs reach ~50: bf16 weights move them by ~0.1
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    if not amx:
        torch.testing.assert_close(got, (x.bfloat16().float() @ weight.T + bias).bfloat16(), rtol=2**-8, atol=0)
    # Below the threshold both hosts keep the bf16 copy (half the bytes: it won there without AMX too).
    small = x[: FP32_GEMM_MIN_ROWS_WITHOUT_AMX - 1]
    assert (layer(small) - fp32[: len(small)]).abs().max().item() > 1e-2


@pytest.mark.parametrize("amx", [True, False])
def test_model_without_amx_computes_large_steps_in_fp32(
    amx: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mixed-precision model keeps bf16 blocks for small steps everywhere; without AMX its large steps (prefill
    chunks, big batches) run in fp32, closer to the exact model, over the same bf16 KV cache."""
    monkeypatch.setattr(linear_module, "amx_available", lambda: amx)
    folder = write_tiny_model(tmp_path / "model")
    mixed = load_llama(folder, make_linear=mixed_precision_linear_factory)
    assert mixed.kv_dtype == torch.bfloat16 and mixed.compute_dtype(1) == torch.bfloat16
    large = FP32_GEMM_MIN_ROWS_WITHOUT_AMX
    assert mixed.compute_dtype(large) == (torch.bfloat16 if amx else torch.float32)
    assert mixed.compute_dtype(large - 1) == torch.bfloat16
    ids = torch.arange(large) % mixed.arch.vocab_size
    exact = load_llama(folder, make_linear=dense_linear_factory)
    expected = prefill_logits(exact, ids)
    error = (prefill_logits(mixed, ids) - expected).abs().max().item()
    assert error < (0.05 if amx else 0.01) * expected.abs().max().item()


def prefill_logits(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one prefill step of `ids` over fresh caches in the model's KV dtype."""
    arch, n = model.arch, ids.shape[0]
    keys = [torch.zeros(1, n, arch.num_kv_heads, arch.head_dim, dtype=model.kv_dtype) for _ in model.layers]
    values = [torch.zeros_like(k) for k in keys]
    return model.compute_logits(model.forward(ids, SlotBatch.build([0], [n], [n]), keys, values))
