"""Top-k sparse linear: both backends and both paths equal the masked dense reference on the kept channels."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch

from fusedserve.kernels.linear import BF16_MIN_ROWS, DenseLinear
from fusedserve.kernels.sparse_linear import (
    MAX_UNION_FRACTION_CPP,
    TopKSparseLinear,
    at_thread_count,
    expected_union,
    load_sparse_linear_extension,
    max_union_fraction,
    topk_mask,
)

torch.set_num_threads(1)
ThreadsAt = Callable[[int], AbstractContextManager[None]]  # the torch_threads fixture (tests/conftest.py)
needs_cpp = pytest.mark.skipif(load_sparse_linear_extension() is None, reason="C++ extension unavailable")


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> torch.Tensor:
    """float64 (TopK_k(x)) @ W^T + b: only the k largest |x| of each row contribute."""
    y = topk_mask(x.double(), k) @ weight.double().T
    return y if bias is None else y + bias.double()


def make(out_features: int = 192, in_features: int = 160, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen), torch.randn(out_features, generator=gen)


@needs_cpp
@pytest.mark.parametrize("rows", [1, 3, 6, 7, 16])
@pytest.mark.parametrize("k", [1, 40, 159, 160])
def test_cpp_sparse_path_equals_masked_dense_reference(rows: int, k: int) -> None:
    weight, bias = make()
    layer = TopKSparseLinear(weight, bias, k, backend="cpp", union_table={16: 2.0})
    x = torch.randn(rows, 160)
    torch.testing.assert_close(layer(x).double(), reference(x, weight, bias, k), rtol=1e-5, atol=1e-4)
    assert layer.stats.sparse_calls == 1 and layer.stats.dense_calls == 0


@needs_cpp
@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("k", [40, 160])
def test_cpp_sparse_path_with_bf16_tiles_equals_the_reference_on_bf16_weights(rows: int, k: int) -> None:
    """bf16 tiles change only the weights' rounding: widening is exact and accumulation stays fp32."""
    weight, bias = make()
    layer = TopKSparseLinear(weight, bias, k, backend="cpp", union_table={16: 2.0}, tile_dtype=torch.bfloat16)
    assert layer.weight_tiles.dtype == torch.bfloat16
    x = torch.randn(rows, 160)
    expected = reference(x, weight.bfloat16().float(), bias, k)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)
    assert layer.stats.sparse_calls == 1


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("k", [0, 1, 70, 160])
@pytest.mark.parametrize("tokens", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_steps_over_bf16_weights_walk_input_major_rows_and_equal_the_reference(
    threads: int, k: int, tokens: int, dtype: torch.dtype, torch_threads: ThreadsAt
) -> None:
    """Up to 4 tokens take the row walk over the union of their kept rows (two threads split the rows and add their
    partial sums)."""
    weight, bias = make(out_features=576)
    layer = TopKSparseLinear(weight, bias, k, backend="cpp", union_table={16: 2.0}, tile_dtype=torch.bfloat16)
    assert layer.weight_rows is not None and layer.weight_rows.shape == (160, 576)
    # Distinct magnitudes, exact in bf16: rounding creates no ties, whose order the reference's topk leaves open.
    gen = torch.Generator().manual_seed(k + tokens)
    magnitudes = torch.stack([torch.randperm(160, generator=gen) + 1 for _ in range(tokens)]).float() / 32
    signs = torch.randint(0, 2, (tokens, 160), generator=gen) * 2 - 1
    x = (magnitudes * signs).to(dtype)
    expected = reference(x.float(), weight.bfloat16().float(), bias, k)
    with torch_threads(threads):
        got = layer(x)
    assert got.dtype == dtype and got.shape == (tokens, 576) and layer.stats.sparse_calls == 1
    tolerance = {"rtol": 1e-5, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 5e-2}
    torch.testing.assert_close(got.double(), expected.to(dtype).double(), **tolerance)


@needs_cpp
def test_sparse_layer_walks_the_dense_layers_row_copy_instead_of_its_own() -> None:
    weight, bias = make()
    dense = DenseLinear(weight, bias)
    layer = TopKSparseLinear(weight, bias, 40, dense, backend="cpp", tile_dtype=torch.bfloat16)
    assert dense.bf16_rows is not None and layer.weight_rows is dense.bf16_rows
    fp32 = TopKSparseLinear(weight, bias, 40, dense, backend="cpp", tile_dtype=torch.float32)
    assert fp32.weight_rows is None and fp32.weight_tiles.dtype == torch.float32  # fp32 tiles serve every step


@needs_cpp
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tile_dtype", [torch.float32, torch.bfloat16])
def test_single_token_path_over_several_tiles_at_once_equals_the_reference(
    threads: int, tile_dtype: torch.dtype, torch_threads: ThreadsAt
) -> None:
    """576 outputs = 9 tiles: groups of four tiles walked together, then a remainder tile on its own."""
    weight, bias = make(out_features=576)
    layer = TopKSparseLinear(weight, bias, 70, backend="cpp", union_table={16: 2.0}, tile_dtype=tile_dtype)
    x = torch.randn(1, 160)
    expected = reference(x, weight.to(tile_dtype).float(), bias, 70)
    with torch_threads(threads):
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-4)
    assert layer.stats.sparse_calls == 1


@needs_cpp
def test_cpp_sparse_path_never_reads_weight_rows_of_dropped_channels() -> None:
    weight, _ = make()
    x = torch.zeros(2, 160)
    x[0, [3, 50, 99]] = torch.tensor([2.0, -3.0, 1.5])
    x[1, [50, 120, 7]] = torch.tensor([-1.0, 4.0, 0.5])
    poisoned = weight.clone()
    dropped = [i for i in range(160) if i not in (3, 7, 50, 99, 120)]
    poisoned[:, dropped] = float("nan")
    layer = TopKSparseLinear(poisoned, None, 3, backend="cpp", union_table={16: 2.0})
    torch.testing.assert_close(layer(x).double(), reference(x, weight, None, 3), rtol=1e-5, atol=1e-4)


@needs_cpp
@pytest.mark.parametrize("limit", [0.0, 0.5])  # 0.0: selection skipped; 0.5: the union (~all 160) exceeds it
def test_cpp_dense_fallback_is_exact_dense_or_masked_dense(limit: float) -> None:
    weight, bias = make()
    dense = DenseLinear(weight, bias, bf16_min_rows=None)
    x = torch.randn(4, 160)
    exact = TopKSparseLinear(weight, bias, 64, dense, backend="cpp", union_table={16: limit})
    torch.testing.assert_close(exact(x).double(), x.double() @ weight.double().T + bias, rtol=1e-5, atol=1e-4)
    masked = TopKSparseLinear(weight, bias, 64, dense, "cpp", union_table={16: limit}, mask_dense_path=True)
    torch.testing.assert_close(masked(x).double(), reference(x, weight, bias, 64), rtol=1e-5, atol=1e-4)
    assert exact.stats.dense_calls == masked.stats.dense_calls == 1
    assert exact.stats.sparse_calls == masked.stats.sparse_calls == 0


@needs_cpp
def test_cpp_topk_mask_keeps_exactly_k_largest_magnitudes_per_row() -> None:
    x = torch.randn(37, 300)
    masked = load_sparse_linear_extension().topk_mask(x, 120)
    assert torch.equal(masked, topk_mask(x, 120))
    assert torch.all((masked != 0).sum(-1) == 120)


@needs_cpp
def test_cpp_topk_breaks_ties_to_exactly_k() -> None:
    x = torch.ones(2, 64)
    masked = load_sparse_linear_extension().topk_mask(x, 10)
    assert torch.all((masked != 0).sum(-1) == 10)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_cpp)])
def test_many_rows_take_the_dense_path_masked_only_when_asked(backend: str) -> None:
    weight, bias = make()
    dense = DenseLinear(weight, bias, bf16_min_rows=None)
    x = torch.randn(40, 160)  # a prefill chunk: more rows than any sparse path takes
    masked = TopKSparseLinear(weight, bias, 50, dense, backend=backend, mask_dense_path=True)
    torch.testing.assert_close(masked(x).double(), reference(x, weight, bias, 50), rtol=1e-5, atol=1e-4)
    exact = TopKSparseLinear(weight, bias, 50, dense, backend=backend)
    torch.testing.assert_close(exact(x), dense(x))
    assert masked.stats.dense_calls == exact.stats.dense_calls == 1


def test_torch_backend_single_token_equals_reference() -> None:
    weight, bias = make()
    layer = TopKSparseLinear(weight, bias, 60, backend="torch")
    x = torch.randn(1, 160)
    torch.testing.assert_close(layer(x).double(), reference(x, weight, bias, 60), rtol=1e-5, atol=1e-4)
    assert layer.stats.sparse_calls == 1


def test_torch_backend_is_used_where_the_cpp_kernel_does_not_fit() -> None:
    weight, _ = make(out_features=100)  # not a multiple of the 64-column tile
    assert TopKSparseLinear(weight, None, 10).backend == "torch"
    with pytest.raises(RuntimeError):
        TopKSparseLinear(weight, None, 10, backend="cpp")


def test_union_fraction_table_uses_the_next_measured_row_count() -> None:
    table = {1: 0.9, 4: 0.7, 16: 0.5}
    assert max_union_fraction(table, 1) == 0.9
    assert max_union_fraction(table, 3) == 0.7
    assert max_union_fraction(table, 16) == 0.5
    assert max_union_fraction(table, 17) == 0.0


def test_thread_tables_apply_from_their_thread_count_up() -> None:
    by_threads = {1: "one", 2: "two", 8: "eight"}
    assert at_thread_count(by_threads, 1) == "one"
    assert at_thread_count(by_threads, 4) == "two"
    assert at_thread_count(by_threads, 16) == "eight"
    assert at_thread_count({2: "two"}, 1) == "two"  # below every measured count: the smallest


def test_the_default_break_even_follows_the_calling_threads_count() -> None:
    weight, bias = make(out_features=128)
    layer = TopKSparseLinear(weight, bias, 32, backend="cpp")
    for threads, table in MAX_UNION_FRACTION_CPP.items():
        assert layer.union_table(threads) == table
        largest_measured_rows = max(table)
        assert not layer.may_take_sparse_path(largest_measured_rows + 1, threads)


def test_expected_union_is_k_for_one_row_and_grows_with_rows() -> None:
    assert expected_union(288, 576, 1) == pytest.approx(0.5)
    assert expected_union(288, 576, 4) == pytest.approx(0.75)  # two independent rows
    assert expected_union(288, 576, 16) > 0.99


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_bf16_activations_take_either_path_and_come_back_bf16(backend: str) -> None:
    """A mixed-precision model hands large steps over in bf16; sparse or dense, the layer answers in bf16."""
    if backend == "cpp" and load_sparse_linear_extension() is None:
        pytest.skip("C++ extension unavailable")
    weight, bias = make()
    rows = 1 if backend == "torch" else 8
    layer = TopKSparseLinear(weight, bias, 40, backend=backend, union_table={16: 2.0})
    assert layer.bf16_min_rows == layer.dense.bf16_min_rows == BF16_MIN_ROWS  # the dense path's, reported
    # Distinct magnitudes that bf16 holds exactly (n / 64, n <= 160): no ties for the top-k to break differently.
    gen = torch.Generator().manual_seed(5)
    magnitudes = torch.stack([torch.randperm(160, generator=gen) + 1 for _ in range(rows)]) / 64
    x = magnitudes * (torch.randint(0, 2, (rows, 160), generator=gen) * 2 - 1)
    sparse = layer(x.bfloat16())
    assert sparse.dtype == torch.bfloat16 and layer.stats.sparse_calls == 1
    expected = reference(x, weight, bias, 40)
    torch.testing.assert_close(sparse.double(), expected, rtol=2e-2, atol=5e-2)
    dense = layer(torch.randn(32, 160).bfloat16())  # too many rows for the sparse path
    assert dense.dtype == torch.bfloat16 and layer.stats.dense_calls == 1


@needs_cpp
@pytest.mark.parametrize("rows", [1, 5])
def test_cpp_kernel_takes_bf16_input_and_answers_in_bf16_on_both_outcomes(rows: int) -> None:
    """The kernel widens a bf16 input itself: the sparse result and the declined (masked) input come back bf16
    and equal what the fp32 call computes on the same (bf16-representable) values."""
    ext = load_sparse_linear_extension()
    weight, bias = make()
    layer = TopKSparseLinear(weight, bias, 40, backend="cpp")
    x = torch.randn(rows, 160).bfloat16()
    for limit in (2.0, 0.0):  # 2.0: always sparse; 0.0: always declined
        got, used_sparse = ext.topk_sparse_linear(x, layer.weight_tiles, bias, 40, limit)
        want, want_sparse = ext.topk_sparse_linear(x.float(), layer.weight_tiles, bias, 40, limit)
        assert used_sparse == want_sparse == (limit > 1.0)
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        torch.testing.assert_close(got, want.bfloat16(), rtol=0, atol=0)
