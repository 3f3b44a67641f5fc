"""Per-module sparsity levels for LaRoSA/TEAL top-k: which fraction of each linear's inputs a token drops.

The sparsified linears of a Llama layer are qkv_proj and gate_up_proj (inputs: the normalised residual stream),
o_proj (input: the attention output) and down_proj (input: the MLP intermediate). Following the LaRoSA reference
the residual-stream inputs get a smaller sparsity than o/down inputs (ratio 0.8 : 1.2), but the levels are scaled
so that the parameter-weighted average sparsity equals the requested target exactly (the reference's fixed
coefficients undershoot by 6-8%). This module only does arithmetic; it never touches weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusedserve.engine.model.arch import LlamaArch

SPARSE_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
REFERENCE_RATIOS: dict[str, float] = {"qkv_proj": 0.8, "gate_up_proj": 0.8, "o_proj": 1.2, "down_proj": 1.2}
MAX_MODULE_SPARSITY = 0.95  # no module drops more than this; higher targets are rejected


@dataclass(frozen=True)
class ModuleShape:
    in_features: int
    out_features: int

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def module_shapes(arch: LlamaArch) -> dict[str, ModuleShape]:
    """The [in, out] shape of each sparsified linear kind of one layer (merged qkv and gate_up, as the engine)."""
    q_size = arch.num_heads * arch.head_dim
    kv_size = arch.num_kv_heads * arch.head_dim
    d, ffn = arch.hidden_size, arch.intermediate_size
    return {
        "qkv_proj": ModuleShape(d, q_size + 2 * kv_size),
        "o_proj": ModuleShape(q_size, d),
        "gate_up_proj": ModuleShape(d, 2 * ffn),
        "down_proj": ModuleShape(ffn, d),
    }


def kept_channels(sparsity: float, in_features: int) -> int:
    """k = number of inputs a token keeps: in_features minus the rounded number dropped, at least 1."""
    return max(1, in_features - round(sparsity * in_features))


@dataclass(frozen=True)
class SparsityPlan:
    """The target and the sparsity of each module kind (the same for every layer)."""

    target: float
    module_sparsity: dict[str, float] = field(default_factory=dict)

    def kept(self, kind: str, in_features: int) -> int | None:
        """k for a module kind, or None where that kind stays dense (not sparsified, or sparsity 0)."""
        sparsity = self.module_sparsity.get(kind, 0.0)
        return None if sparsity <= 0.0 else kept_channels(sparsity, in_features)

    def achieved(self, shapes: dict[str, ModuleShape]) -> float:
        """Parameter-weighted fraction of weight rows skipped, after rounding k to whole channels."""
        total = sum(shape.params for shape in shapes.values())
        skipped = 0.0
        for kind, shape in shapes.items():
            k = self.kept(kind, shape.in_features)
            dropped = 0 if k is None else shape.in_features - k
            skipped += dropped / shape.in_features * shape.params
        return skipped / total

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "module_sparsity": dict(self.module_sparsity)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SparsityPlan:
        return cls(float(data["target"]), {k: float(v) for k, v in data["module_sparsity"].items()})


def plan_sparsity(
    shapes: dict[str, ModuleShape], target: float, ratios: dict[str, float] | None = None
) -> SparsityPlan:
    """Module sparsities s_m = min(cap, lam * r_m * target) with lam chosen so sum P_m s_m = target * sum P_m."""
    ratios = ratios or REFERENCE_RATIOS
    if not 0.0 <= target < MAX_MODULE_SPARSITY:
        raise ValueError(f"sparsity must be in [0, {MAX_MODULE_SPARSITY}), got {target}")
    if target == 0.0:
        return SparsityPlan(0.0, {kind: 0.0 for kind in shapes})
    total = sum(shape.params for shape in shapes.values())

    def weighted(lam: float) -> float:
        return sum(min(MAX_MODULE_SPARSITY, lam * ratios[k] * target) * s.params for k, s in shapes.items()) / total

    low, high = 0.0, MAX_MODULE_SPARSITY / (target * min(ratios[k] for k in shapes))
    for _ in range(100):  # weighted() is continuous and non-decreasing in lam: bisection
        mid = (low + high) / 2
        low, high = (mid, high) if weighted(mid) < target else (low, mid)
    lam = (low + high) / 2
    return SparsityPlan(target, {k: min(MAX_MODULE_SPARSITY, lam * ratios[k] * target) for k in shapes})


def plan_for_arch(arch: LlamaArch, target: float, ratios: dict[str, float] | None = None) -> SparsityPlan:
    return plan_sparsity(module_shapes(arch), target, ratios)
