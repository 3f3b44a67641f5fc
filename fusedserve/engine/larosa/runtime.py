"""The runtime half of LaRoSA: the linear factory that serves a LaRoSA folder with top-k sparse linears.

`larosa_linear_factory(model_dir)` reads the folder's manifest; where it has a "larosa" entry it returns a
`make_linear` for `load_llama` that builds `TopKSparseLinear` for q/k/v, o, gate/up and down (k from the sparsity
plan: each layer its own where the plan is per layer, else one per module kind) and dense linears for everything
else (LM head); otherwise None. Dense linears (the LM head, and each sparse layer's dense path for large batches)
come from the caller's own factory, so the engine's dtype policy still applies. The same `sparse_linear_factory`,
given a plan for an unrotated model, is plain magnitude top-k (TEAL-style), the baseline LaRoSA is measured against.
This module never decides when the sparse path pays (kernels/sparse_linear.py does, per call).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fusedserve.engine.larosa.sensitivity import SensitivityTable
from fusedserve.engine.larosa.sparsity import GREEDY, SparsityPlan, module_shapes, plan_for_arch
from fusedserve.engine.manifest import read_manifest
from fusedserve.engine.model.arch import LlamaArch
from fusedserve.engine.model.loader import LinearFactory, mixed_precision_linear_factory
from fusedserve.kernels.linear import Linear
from fusedserve.kernels.sparse_linear import TopKSparseLinear

MANIFEST_KEY = "larosa"


def sparse_linear_factory(
    plan: SparsityPlan, dense: LinearFactory | None = None, backend: str = "auto", mask_dense_path: bool = False
) -> LinearFactory:
    """make_linear(name, weight, bias): top-k sparse where the plan sparsifies that module kind, `dense` elsewhere.

    mask_dense_path: sparsify every token, also where the dense kernel computes (prefill, large batches); off
    for serving (the dense path then computes the exact dense product), on for measuring the method's quality.
    """
    dense = dense or mixed_precision_linear_factory

    def make_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        k = plan.kept(module_kind(name), weight.shape[1], layer_index(name))
        dense_layer = dense(name, weight, bias)
        if k is None or k >= weight.shape[1]:
            return dense_layer
        # Mixed precision (the dense layer keeps a bf16 copy) extends to the sparse path's weights.
        mixed = getattr(dense_layer, "bf16_min_rows", None) is not None
        return TopKSparseLinear(
            weight,
            bias,
            k,
            dense_layer,
            backend=backend,
            mask_dense_path=mask_dense_path,
            tile_dtype=torch.bfloat16 if mixed else torch.float32,
        )

    return make_linear


def module_kind(name: str) -> str:
    """The module kind of a linear's name: layers.3.qkv_proj -> qkv_proj, lm_head -> lm_head."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    """The layer of a linear's name: layers.3.qkv_proj -> 3; None outside the decoder layers (lm_head)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) == 3 and parts[0] == "layers" else None


def larosa_plan(model_dir: Path, sparsity: float | None = None, allocation: str | None = None) -> SparsityPlan | None:
    """The folder's sparsity plan, or one re-planned for `sparsity` and/or `allocation` (default: the folder's own);
    None for a folder without LaRoSA. Greedy re-planning reads the folder's sensitivity table."""
    model_dir = Path(model_dir)
    entry = read_manifest(model_dir).get(MANIFEST_KEY)
    if entry is None:
        return None
    plan = SparsityPlan.from_json(entry["plan"])
    if sparsity is None and allocation in (None, plan.allocation):
        return plan
    return plan_for(model_dir, plan.target if sparsity is None else sparsity, allocation or plan.allocation)


def plan_for(model_dir: Path, sparsity: float, allocation: str) -> SparsityPlan:
    """A plan for any Llama folder: fixed-ratio from its shapes, greedy from its sensitivity table."""
    arch = LlamaArch.from_model_dir(model_dir)
    if allocation != GREEDY:
        return plan_for_arch(arch, sparsity)
    table = SensitivityTable.load(model_dir)
    if table is None:
        raise FileNotFoundError(f"{model_dir} has no sensitivity table for the greedy allocation")
    return table.greedy_plan(module_shapes(arch), sparsity)


def larosa_linear_factory(
    model_dir: Path, dense: LinearFactory | None = None, sparsity: float | None = None, backend: str = "auto"
) -> LinearFactory | None:
    """The engine's make_linear for a LaRoSA folder (manifest sparsity unless overridden), or None.

    `dense`: the factory for dense layers (default: mixed precision, fp32 for small batches, bf16 for large).
    """
    plan = larosa_plan(Path(model_dir), sparsity)
    return None if plan is None else sparse_linear_factory(plan, dense, backend)
