"""Top-k sparse linear layers (LaRoSA, TEAL): per token keep the k largest-magnitude inputs, read only their weights.

One entry, `TopKSparseLinear`, implements the engine's `Linear` interface. Per call it takes one of two paths:
- sparse: y = TopK_k(x) @ W^T + b, TopK_k zeroing all but the k largest |x| of each token, computed as the sum
  over kept channels i of x_i * W^T[i, :], reading only those weight rows from an input-major copy. For a batch
  the rows of the union of the tokens' kept channels are read once. Used for up to SPARSE_MAX_ROWS tokens when
  the union is at most MAX_UNION_FRACTION[rows] of the inputs (measured break-even points).
- dense: a dense `Linear` (dense [out, in] layout; by default `DenseLinear`, which switches to a bf16 copy on
  AMX for larger row counts) on the input as it is, where sparse cannot pay (prefill chunks, large decode
  batches): the exact dense product, so falling back never costs quality and never costs time on selection.
  With mask_dense_path=True it runs on TopK_k(x) instead, so the layer computes TopK_k(x) @ W^T + b on every
  path (quality evaluation of the method itself; the two paths then agree to fp32 or bf16 rounding).
Backends: the C++/OpenMP extension (kernels/cpu/sparse_linear.cpp) where it builds: weights tiled [out/64, in, 64]
for batches, and for bf16 weights an input-major [in, out] copy, shared with the dense layer's row walk, that steps
of up to 4 tokens walk. Else pure torch (F.embedding_bag over W^T [in, out], which reads per token, not per union).
On CUDA the Triton kernel (kernels/gpu/sparse_gemv.py, over the same W^T) serves small batches and dense cuBLAS the
rest.
This module never changes weights and never decides sparsity levels (engine/larosa/sparsity.py does).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import torch
import torch.nn.functional as F

from fusedserve.kernels.cpu.extensions import load_cpp_extension
from fusedserve.kernels.linear import ROW_WALK_MAX_ROWS, DenseLinear, Linear

T = TypeVar("T")

CPP_SOURCE = "sparse_linear.cpp"
CPP_TILE = 64  # output columns per weight tile of the C++ kernel
SPARSE_MAX_ROWS = 16  # above this many tokens the union of kept channels covers the input: always dense
# Largest union of kept channels (fraction of the inputs) at which a LaRoSA model's sparse layers still beat its
# dense path, per torch thread count (the largest measured count <= the current one applies) and per row count (the
# smallest key >= rows applies; rows beyond the last key go dense, and to the model's dense twin).
# Up to 4 rows run the row walk over the union of kept channels; against the dense layer's own row walk over
# SmolLM2's four linears of a layer (bf16, from memory, selection included) it takes, 1 thread:
# - 1 row: 0.46 / 0.67 / 0.84 / 0.91 / 0.96 / 1.01 of the time at 30 / 50 / 70 / 80 / 90 / 100% kept (2 threads:
#   0.48 / 0.68 / 0.82 / 0.90 / 0.97 / 0.98);
# - 2 / 3 / 4 rows at a union of 75%: 0.88 / 0.90 / 0.91; at 85%: 0.96 / 0.96 / 0.99; at 95%: 1.01 / 1.04 / 1.06.
# The limits sit a little below break-even: a step also pays the residual adapters, which the dense twin skips
# (the model's timed choice, engine/model/llama.py, settles the close cases per host).
MAX_UNION_FRACTION_CPP: dict[int, dict[int, float]] = {1: {1: 0.95, 2: 0.9, 3: 0.85, 4: 0.8}, 2: {1: 0.95, 2: 0.85}}
MAX_KEPT_FRACTION_TORCH = 0.6  # embedding_bag path: 1 row only, k / in at most this


def at_thread_count(by_threads: dict[int, T], threads: int) -> T:
    """The entry measured at the largest thread count <= `threads` (the smallest measured one below all)."""
    measured = [count for count in by_threads if count <= threads] or [min(by_threads)]
    return by_threads[max(measured)]


def max_union_fraction(table: dict[int, float], rows: int) -> float:
    """The break-even union fraction for `rows` tokens: the entry of the smallest measured row count >= rows."""
    for measured in sorted(table):
        if rows <= measured:
            return table[measured]
    return 0.0


def expected_union(k: int, in_features: int, rows: int) -> float:
    """A low estimate of the union of `rows` tokens' top-k sets, as a fraction of the inputs: tokens of one batch
    overlap, so count half of them as independent (measured on SmolLM2 at 50%: 81% at 4 rows, 96% at 16)."""
    return 1.0 - (1.0 - k / in_features) ** max(1, rows // 2)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Reference TopK: x with all but the k largest-magnitude entries of each row set to zero."""
    if k >= x.shape[-1]:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    index = x.abs().topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x).scatter_(-1, index, x.gather(-1, index))


@dataclass
class SparseLinearStats:
    """How often each path ran (a layer's own counters; read by benchmarks and tests)."""

    sparse_calls: int = 0
    dense_calls: int = 0


def load_sparse_linear_extension() -> ModuleType | None:
    """The compiled kernels (topk_sparse_linear, topk_mask), or None where they cannot be built."""
    return load_cpp_extension(CPP_SOURCE)


def resolve_backend(backend: str, weight: torch.Tensor) -> tuple[str, ModuleType | None]:
    """("cpp", module) where the extension loads and suits the weight, else ("torch", None)."""
    if backend not in ("auto", "cpp", "torch"):
        raise ValueError(f"unknown sparse linear backend {backend!r} (auto, cpp, torch)")
    suits = weight.dtype == torch.float32 and weight.device.type == "cpu" and weight.shape[0] % CPP_TILE == 0
    if backend != "torch" and suits:
        module = load_sparse_linear_extension()
        if module is not None:
            return "cpp", module
    if backend == "cpp":
        raise RuntimeError("the C++ sparse linear backend is unavailable for this weight (fp32, out % 64, g++)")
    return "torch", None


class TopKSparseLinear:
    """y = TopK_k(x) @ W^T + b on the sparse path, x @ W^T + b (or masked) on the dense one; chosen per call."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        k: int,
        dense: Linear | None = None,
        backend: str = "auto",
        union_table: dict[int, float] | None = None,
        mask_dense_path: bool = False,
        tile_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`dense` computes the same weight densely (default: DenseLinear(weight, bias)) for the dense path.

        tile_dtype: the C++ kernel's weight copy, float32 or bfloat16 (widened exactly, accumulated in fp32). A
        decode step streams its weights from memory, so bf16 tiles halve most of the sparse path's time; they
        suit a mixed-precision model, whose dense path computes with a bf16 copy already.
        """
        self.mask_dense_path = mask_dense_path
        self.out_features, self.in_features = weight.shape
        self.k = max(0, min(int(k), self.in_features))
        self.bias = bias
        self.device = weight.device
        self.dense = dense if dense is not None else DenseLinear(weight, bias)
        # Rows from which the model may hand this layer bf16 activations (a mixed-precision model's large
        # steps, see model/llama.py): the dense path's own threshold. The sparse kernels read fp32, so the
        # sparse path converts the few rows it takes (at most SPARSE_MAX_ROWS) and returns the input's dtype.
        self.bf16_min_rows: int | None = getattr(self.dense, "bf16_min_rows", None)
        self.fp32_min_rows: int | None = getattr(self.dense, "fp32_min_rows", None)  # likewise, hosts without AMX
        self.backend, self._ext = resolve_backend(backend, weight)
        self.stats = SparseLinearStats()
        self._union_table = union_table  # None: MAX_UNION_FRACTION_CPP at the calling thread's thread count
        # (rows, threads) -> the largest union the sparse path may take, or None where it surely goes dense:
        # decided once per step shape, since a decode step calls every sparse layer with the same shape.
        self._limits: dict[tuple[int, int], float | None] = {}
        # Steps of up to ROW_WALK_MAX_ROWS tokens over bf16 weights walk input-major rows [in, out] (each kept
        # channel one contiguous run; kernels/cpu/sparse_linear.cpp, topk_rows_linear): 1.4x faster per layer than
        # the tiles at one token, 50%. The dense layer's row walk reads the same copy: share it where it keeps one.
        self.weight_rows: torch.Tensor | None = None
        if self._ext is not None:
            # The tiles serve steps the row walk does not take (more than ROW_WALK_MAX_ROWS tokens, fp32 weights):
            # built on first use, as a served bf16 model's tables send such steps to the dense path.
            self._tile_source, self._tile_dtype = weight, tile_dtype
            self._weight_tiles: torch.Tensor | None = None
            if tile_dtype == torch.bfloat16:
                shared = getattr(self.dense, "bf16_rows", None)
                self.weight_rows = shared if shared is not None else weight.t().to(torch.bfloat16).contiguous()
        else:
            self.weight_t = weight.t().contiguous()  # [in, out]: kept channel i is row i

    @property
    def weight_tiles(self) -> torch.Tensor:
        """[out / 64, in, 64] in the tile dtype: tile b holds W^T[:, 64b:64b+64], so each kept input channel is 64
        contiguous weights per tile."""
        if self._weight_tiles is None:
            source, tiles = self._tile_source, self.out_features // CPP_TILE
            self._weight_tiles = (
                source.t().reshape(self.in_features, tiles, CPP_TILE).permute(1, 0, 2).to(self._tile_dtype).contiguous()
            )
        return self._weight_tiles

    def union_table(self, threads: int | None = None) -> dict[int, float]:
        """Break-even unions by row count at `threads` torch threads (default: the calling thread's count)."""
        if self._union_table is not None:
            return self._union_table
        return at_thread_count(MAX_UNION_FRACTION_CPP, threads if threads is not None else torch.get_num_threads())

    def may_take_sparse_path(self, rows: int, threads: int | None = None) -> bool:
        """Whether a call with `rows` tokens may compute sparsely; False means it surely takes the dense path
        (the model hands such steps to its dense twin, engine/larosa/dense_twin.py)."""
        if self.device.type == "cuda":
            from fusedserve.kernels.gpu.sparse_gemv import use_sparse_gemv

            return use_sparse_gemv(rows, self.k, self.in_features)
        if self._ext is not None:
            return self._union_limit(rows, threads if threads is not None else torch.get_num_threads()) is not None
        return rows == 1 and self.k <= MAX_KEPT_FRACTION_TORCH * self.in_features

    def _union_limit(self, rows: int, threads: int) -> float | None:
        """The C++ path's largest acceptable union for `rows` tokens at `threads` threads, or None where the
        expected union already exceeds it (sparse cannot pay: skip the selection and go dense)."""
        key = (rows, threads)
        if key not in self._limits:
            fraction = max_union_fraction(self.union_table(threads), rows) if rows <= SPARSE_MAX_ROWS else 0.0
            surely_dense = expected_union(self.k, self.in_features, rows) > fraction
            self._limits[key] = None if surely_dense else fraction
        return self._limits[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self._ext is not None:  # the CPU decode path first: it runs ~120 times per step
            limit = self._union_limit(rows, torch.get_num_threads())
            if limit is None:
                return self._dense_path(x)
            if rows <= ROW_WALK_MAX_ROWS and self.weight_rows is not None:
                # No check of the actual union here: at a full union the walk measured 1.01-1.06x the dense one's
                # time, so a union above the estimate costs little, and one token's union is its own k exactly.
                self._count(True)
                return self._ext.topk_rows_linear(x, self.weight_rows, self.bias, self.k)
            # fp32 or bf16 in, the same dtype out (the kernel widens and rounds itself: no extra torch ops)
            out, used_sparse = self._ext.topk_sparse_linear(x, self.weight_tiles, self.bias, self.k, limit)
            if used_sparse:
                self._count(True)
                return out
            if self.mask_dense_path:
                self._count(False)
                return self.dense(out)  # the extension hands back TopK_k(x) when it declines
            return self._dense_path(x)
        if not self.may_take_sparse_path(rows):
            return self._dense_path(x)
        if x.device.type == "cuda":
            from fusedserve.kernels.gpu.sparse_gemv import topk_sparse_gemv

            self._count(True)
            return topk_sparse_gemv(x, self.weight_t, self.bias, self.k)
        self._count(True)
        xf = x.float()
        index = xf.abs().topk(self.k, dim=-1, sorted=False).indices
        y = F.embedding_bag(index, self.weight_t, per_sample_weights=xf.gather(-1, index), mode="sum")
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def _dense_path(self, x: torch.Tensor) -> torch.Tensor:
        self._count(False)
        if self.mask_dense_path:
            mask = self._ext.topk_mask if self._ext is not None else topk_mask
            x = mask(x.float(), self.k).to(x.dtype)
        return self.dense(x)

    def _count(self, used_sparse: bool) -> None:
        if used_sparse:
            self.stats.sparse_calls += 1
        else:
            self.stats.dense_calls += 1
