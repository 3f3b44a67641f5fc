"""Linear layers the model calls through one small interface: `y = layer(x)` with x [T, in] and y [T, out].

The dense layer picks its compute dtype per call by the batch's token count: on this class of CPU a bf16 matrix
multiply runs on AMX and is several times faster than fp32 once there are enough rows. From cache a bf16
matrix-vector product is slower than fp32, but a decode step streams its weights from memory, where bf16's half
the bytes wins: measured over whole decode steps, bf16 is faster from batch 1 (x1.1-1.2) and about x2 at batch 4,
where fp32 sgemm is at its worst. BF16_MIN_ROWS keeps the switch point a measured constant. A bf16 input
uses the bf16 copy and returns bf16: the model hands its blocks' inputs over in bf16 already (one cast
per block instead of a cast in and out of every linear). A host without AMX is the exception: there large calls
multiply the fp32 weights (FP32_GEMM_MIN_ROWS_WITHOUT_AMX), still bf16 in and out. Sparse layers (LaRoSA)
implement the same interface.
Up to ROW_WALK_MAX_ROWS tokens (small decode batches) do not go to oneDNN: the bf16 weights are also kept
input-major, [in, out], and streamed row by row by the project's own kernel (kernels/cpu/sparse_linear.cpp,
rows_linear: four lockstep streams, each with a software prefetch cursor). At one token that walk (and the
64-column tiled walk before it) measured 1.6-1.9x faster than oneDNN's bf16 product from DRAM on SmolLM2's shapes;
at 2-4 tokens it takes 0.83-0.84 of the tiled walk's time (1 thread; 0.77-0.89 at 2). It is also the fair baseline
for LaRoSA's sparse path, which walks the same rows, skipping the dropped ones.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F

from fusedserve.kernels.norm_rope import rms_norm

# Rows at or above which the bf16 copy wins; measured by benchmarks/decode_dtype.py (docs/results/decode_dtype.json).
BF16_MIN_ROWS = 1
# Tokens per call up to which the row walk serves instead of oneDNN (the C++ kernel's limit). Measured per layer of
# SmolLM2 from DRAM, 1 thread, on the tiled walk before it: 2 rows 648 vs 839 us, 3 rows 696 vs 841, 4 rows 703 vs
# 832; the row walk is faster still (see above). Larger batches keep oneDNN/AMX.
ROW_WALK_MAX_ROWS = 4
ROW_WALK_WIDTH = 64  # the row walk takes layers whose output width is a multiple of this
# The bf16 copy is stored pre-packed in oneDNN's blocked layout for this batch size: F.linear re-packs a plain
# weight on every call, which measured 25-35% of a decode step's linear time at 32 rows (same results).
PACKED_FOR_ROWS = 32
# Without AMX (a CPU without amx_bf16, or a kernel or hypervisor that does not grant the tile state) oneDNN runs the
# bf16 product on AVX-512 and loses to fp32 sgemm once a call has enough rows (SmolLM2's shapes, 1 thread, weights
# in cache, packed bf16 / fp32 time: 8 rows 0.55-1.2, 32 rows 1.0-1.5, 130 rows 1.5-1.6, 512 rows 1.5-1.9). Whole
# decode steps (weights from memory, where bf16 reads half the bytes) put the switch later: fp32 / bf16 step time
# 2.1x at 8 rows, 1.04 at 32, 1.00 at 40, 0.89-0.94 at 48, 0.87 at 64 (1 and 2 threads). From this many rows such a
# host multiplies the fp32 weights instead (the input cast up, the output back).
FP32_GEMM_MIN_ROWS_WITHOUT_AMX = 40


class Linear(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear:
    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16_min_rows: int | None = BF16_MIN_ROWS
    ) -> None:
        self.weight = weight.contiguous()
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        # A bf16 copy only helps fp32 CPU models; a bf16 model already computes in bf16.
        use_copy = bf16_min_rows is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
        self._bf16_weight = _packed_bf16(self.weight) if use_copy else None
        self._bf16_bias = bias.to(torch.bfloat16) if (use_copy and bias is not None) else None
        self._walk = _row_walk_kernel() if use_copy and self.out_features % ROW_WALK_WIDTH == 0 else None
        # [in, out]: row i holds W^T[i, :], the copy TopKSparseLinear walks too (it shares this one)
        self.bf16_rows = self.weight.t().to(torch.bfloat16).contiguous() if self._walk is not None else None
        # Rows from which this layer computes in bf16; None: it always computes in its weights' dtype.
        self.bf16_min_rows: int | None = (bf16_min_rows or 0) if use_copy else None
        # Rows from which the fp32 weights serve even a bf16 input: never where AMX runs the bf16 product. The model
        # reads it too: such steps then run all their blocks in fp32.
        self.fp32_min_rows: int | None = FP32_GEMM_MIN_ROWS_WITHOUT_AMX if use_copy and not amx_available() else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._walk is not None and x.shape[0] <= ROW_WALK_MAX_ROWS:
            return self._walk.rows_linear(x, self.bf16_rows, self.bias)  # bf16 weights, fp32 sums, x's dtype
        if self.fp32_min_rows is not None and x.shape[0] >= self.fp32_min_rows:
            return F.linear(x.float(), self.weight, self.bias).to(x.dtype)
        if self._bf16_weight is not None:
            if x.dtype == torch.bfloat16:
                return _bf16_linear(x, self._bf16_weight, self._bf16_bias)
            if x.shape[0] >= (self.bf16_min_rows or 0):
                return _bf16_linear(x.to(torch.bfloat16), self._bf16_weight, self._bf16_bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class ResidualAdapter:
    """h @ A for an fp32 residual stream that must stay fp32 (LaRoSA's change of basis between layers, [d, d]).

    With `bf16_small_steps`, steps of up to ROW_WALK_MAX_ROWS tokens stream a bf16 copy of A through the row walk
    (fp32 in, fp32 sums, fp32 out): the weight rounding every other linear of a mixed-precision model already has,
    at half the bytes of the fp32 product, which a decode step reads from memory (SmolLM2, batch 1: 3.2 -> 1.5 ms
    of a ~20 ms step over 29 adapters). Larger steps, and every step without the flag, multiply in fp32, exactly.
    """

    def __init__(self, matrix: torch.Tensor, bf16_small_steps: bool) -> None:
        self.matrix = matrix
        walk = bf16_small_steps and matrix.dtype == torch.float32 and matrix.device.type == "cpu"
        self._walk = _row_walk_kernel() if walk and matrix.shape[1] % ROW_WALK_WIDTH == 0 else None
        # h @ A = h @ W^T for W = A^T: A itself is the input-major [in, out] copy the walk reads
        self._bf16_rows = matrix.to(torch.bfloat16).contiguous() if self._walk is not None else None

    def __call__(self, hidden: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        """(hidden + delta) @ A: `delta`, the previous block's output not yet in the residual, is added on the way
        (in the walk's coefficients: no call of its own)."""
        if self._walk is not None and hidden.shape[0] <= ROW_WALK_MAX_ROWS and hidden.dtype == torch.float32:
            return self._walk.rows_linear(hidden, self._bf16_rows, None, delta)
        return (hidden if delta is None else hidden + delta) @ self.matrix

    def enter(
        self,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        norm: torch.Tensor | None,
        eps: float,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden + delta) @ A and its RMSNorm (* norm) in `dtype`: the residual entering a LaRoSA layer and the
        layer's input, one call on the walk's path (a separate norm costs ~10 us of dispatch at decode sizes)."""
        if (
            self._walk is not None
            and hidden.shape[0] <= ROW_WALK_MAX_ROWS
            and hidden.dtype == torch.float32
            and dtype in (torch.float32, torch.bfloat16)
        ):
            entered, normed = self._walk.rows_linear_rms_norm(
                hidden, self._bf16_rows, delta, norm, eps, dtype == torch.bfloat16
            )
            return entered, normed
        entered = self(hidden, delta)
        return entered, rms_norm(entered, norm, eps, dtype)


def _row_walk_kernel():
    """The C++ module with rows_linear, or None without a compiler (oneDNN then serves every row count)."""
    from fusedserve.kernels.cpu.extensions import load_cpp_extension

    return load_cpp_extension("sparse_linear.cpp")


@functools.cache
def amx_available() -> bool:
    """Whether this process may run AMX tile instructions (what makes oneDNN's bf16 products fast on a CPU)."""
    request = getattr(torch._C._cpu, "_init_amx", None)  # asks the kernel for the tile state, as oneDNN does
    if request is not None:
        return bool(request())
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and " amx_bf16" in line for line in cpuinfo)
    except OSError:
        return False


def _packed_bf16(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 copy of `weight` [out, in], pre-packed for oneDNN where this torch build has it (else plain)."""
    plain = weight.to(torch.bfloat16)
    if not torch.backends.mkldnn.is_available():
        return plain
    try:
        return torch.ops.mkldnn._reorder_linear_weight(plain, PACKED_FOR_ROWS)
    except (AttributeError, RuntimeError):  # an op that this build lacks or refuses: keep the plain copy
        return plain


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if weight.is_mkldnn:
        # Packed weights need 2-D input; the model's activations are [tokens, features] already.
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)
