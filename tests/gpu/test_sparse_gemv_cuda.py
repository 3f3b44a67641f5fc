"""LaRoSA's top-k sparse GEMV on CUDA: the Triton kernel equals the dense reference; the layer picks its path.

NOT YET RUN ON A GPU (written 2026-11-21 without one; the kernel itself was checked under Triton's CPU
interpreter, tests/unit/test_gpu_planning.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fusedserve.kernels.linear import DenseLinear
from fusedserve.kernels.sparse_linear import TopKSparseLinear, topk_mask

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="pip install -e '.[gpu]'"),
]

# SmolLM2-135M's sparse shapes: qkv (576 -> 960), o (576 -> 576), gate_up (576 -> 3072), down (1536 -> 576).
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]


@pytest.mark.parametrize(("in_features", "out_features"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_triton_sparse_gemv_equals_the_dense_reference(in_features, out_features, dtype, rows):
    from fusedserve.kernels.gpu.sparse_gemv import topk_sparse_gemv

    generator = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, in_features, device="cuda", generator=generator).to(dtype)
    weight = (torch.randn(out_features, in_features, device="cuda", generator=generator) * 0.05).to(dtype)
    bias = torch.randn(out_features, device="cuda", generator=generator).to(dtype)
    k = in_features // 4
    out = topk_sparse_gemv(x, weight.t().contiguous(), bias, k)
    expected = topk_mask(x.float(), k) @ weight.float().t() + bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


def test_the_layer_uses_triton_for_one_row_and_dense_cublas_for_a_batch():
    weight = torch.randn(960, 576, device="cuda", dtype=torch.bfloat16) * 0.05
    layer = TopKSparseLinear(weight, None, k=144, dense=DenseLinear(weight))
    one, batch = torch.randn(1, 576, device="cuda", dtype=torch.bfloat16), torch.randn(32, 576, device="cuda",
                                                                                         dtype=torch.bfloat16)
    for x in (one, batch):
        expected = topk_mask(x.float(), 144) @ weight.float().t()
        torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)
    assert (layer.stats.sparse_calls, layer.stats.dense_calls) == (1, 1)
