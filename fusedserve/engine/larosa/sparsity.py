"""Per-module sparsity levels for LaRoSA/TEAL top-k: which fraction of each linear's inputs a token drops.

The sparsified linears of a Llama layer are qkv_proj and gate_up_proj (inputs: the normalised residual stream),
o_proj (input: the attention output) and down_proj (input: the MLP intermediate). Two allocations, both with a
parameter-weighted average sparsity equal to the requested target:
- "fixed-ratio" (plan_sparsity): the LaRoSA reference's ratio 0.8 : 1.2 between residual-stream inputs and o/down
  inputs, scaled to hit the target (the reference's fixed coefficients undershoot by 6-8%); the same in every layer.
- "greedy" (allocate_greedy, TEAL-style): per layer and module from measured error curves (sensitivity.py): start
  dense and repeatedly raise the (layer, module) whose next step on the grid adds the least error per weight
  parameter skipped, until the skipped parameters, counted in whole channels, reach the target.
This module only does arithmetic; it never touches weights or runs a model.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fusedserve.engine.model.arch import LlamaArch

SPARSE_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
REFERENCE_RATIOS: dict[str, float] = {"qkv_proj": 0.8, "gate_up_proj": 0.8, "o_proj": 1.2, "down_proj": 1.2}
MAX_MODULE_SPARSITY = 0.95  # no module drops more than this; higher targets are rejected
FIXED_RATIO, GREEDY = "fixed-ratio", "greedy"
ALLOCATIONS = (GREEDY, FIXED_RATIO)


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
    """The target and each module's sparsity: per kind (every layer alike), or per layer where layer_sparsity is set.

    module_sparsity always holds one level per kind (for a per-layer plan: the mean over layers, which has the same
    parameter-weighted average), so a reader that ignores layer_sparsity still serves the target sparsity.
    """

    target: float
    module_sparsity: dict[str, float] = field(default_factory=dict)
    layer_sparsity: tuple[dict[str, float], ...] = ()  # empty: module_sparsity in every layer
    allocation: str = FIXED_RATIO

    def sparsity(self, kind: str, layer: int | None = None) -> float:
        if layer is not None and self.layer_sparsity:
            return self.layer_sparsity[layer].get(kind, 0.0)
        return self.module_sparsity.get(kind, 0.0)

    def kept(self, kind: str, in_features: int, layer: int | None = None) -> int | None:
        """k for a module (of `layer`, where the plan is per layer), or None where it stays dense (sparsity 0)."""
        sparsity = self.sparsity(kind, layer)
        return None if sparsity <= 0.0 else kept_channels(sparsity, in_features)

    def achieved(self, shapes: dict[str, ModuleShape]) -> float:
        """Parameter-weighted fraction of weight rows skipped, after rounding k to whole channels (all layers)."""
        layers: Sequence[int | None] = range(len(self.layer_sparsity)) if self.layer_sparsity else [None]
        total = sum(shape.params for shape in shapes.values()) * len(layers)
        skipped = 0.0
        for layer in layers:
            for kind, shape in shapes.items():
                k = self.kept(kind, shape.in_features, layer)
                dropped = 0 if k is None else shape.in_features - k
                skipped += dropped * shape.out_features
        return skipped / total

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "target": self.target,
            "module_sparsity": dict(self.module_sparsity),
            "allocation": self.allocation,
        }
        if self.layer_sparsity:
            data["layer_sparsity"] = [dict(levels) for levels in self.layer_sparsity]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SparsityPlan:
        """Also reads plans written before per-layer levels existed (no allocation, no layer_sparsity)."""
        layers = tuple({k: float(v) for k, v in levels.items()} for levels in data.get("layer_sparsity", ()))
        return cls(
            float(data["target"]),
            {k: float(v) for k, v in data["module_sparsity"].items()},
            layers,
            str(data.get("allocation", FIXED_RATIO)),
        )


def plan_sparsity(
    shapes: dict[str, ModuleShape], target: float, ratios: dict[str, float] | None = None
) -> SparsityPlan:
    """Module sparsities s_m = min(cap, lam * r_m * target) with lam chosen so sum P_m s_m = target * sum P_m."""
    ratios = ratios or REFERENCE_RATIOS
    _check_target(target)
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


def _check_target(target: float) -> None:
    if not 0.0 <= target < MAX_MODULE_SPARSITY:
        raise ValueError(f"sparsity must be in [0, {MAX_MODULE_SPARSITY}), got {target}")


def allocate_greedy(
    shapes: dict[str, ModuleShape],
    grid: Sequence[float],
    errors: Sequence[dict[str, Sequence[float]]],
    target: float,
) -> SparsityPlan:
    """Per-layer levels minimising the summed error, greedily, at a parameter-weighted average of `target`.

    errors[l][kind][i]: the error of that module of layer l at sparsity grid[i] (grid[0] = 0, increasing, at most
    MAX_MODULE_SPARSITY). A step moves one module one grid point up; its price is the error it adds per weight
    parameter it skips (dropped channels * out_features, k rounded as kept_channels rounds it). Steps are taken
    cheapest first while they fit the budget target * all parameters; the step that would overshoot is taken in
    part, in whole channels, so the achieved average is the target to within half a channel of one module. Lower
    targets stop earlier on the same sequence of steps, so every module's level is monotone in the target.
    """
    _check_target(target)
    if list(grid) != sorted(grid) or grid[0] != 0.0 or grid[-1] > MAX_MODULE_SPARSITY:
        raise ValueError(f"grid must rise from 0 to at most {MAX_MODULE_SPARSITY}: {list(grid)}")
    kinds = [kind for kind in SPARSE_MODULES if kind in shapes]
    dropped = {
        kind: [shapes[kind].in_features - kept_channels(s, shapes[kind].in_features) if s > 0 else 0 for s in grid]
        for kind in kinds
    }
    budget = target * sum(shapes[kind].params for kind in kinds) * len(errors)
    level = [dict.fromkeys(kinds, 0) for _ in errors]
    channels = [dict.fromkeys(kinds, 0) for _ in errors]  # dropped channels per (layer, kind)

    def price(layer: int, kind: str) -> tuple[float, int, int] | None:
        i = level[layer][kind]
        if i + 1 >= len(grid):
            return None
        skipped = (dropped[kind][i + 1] - dropped[kind][i]) * shapes[kind].out_features
        added = errors[layer][kind][i + 1] - errors[layer][kind][i]
        return (added / skipped if skipped else float("-inf"), layer, kinds.index(kind))

    heap = [p for layer in range(len(errors)) for kind in kinds if (p := price(layer, kind)) is not None]
    heapq.heapify(heap)
    skipped_total = 0
    while heap and skipped_total < budget:
        _, layer, kind_index = heapq.heappop(heap)
        kind, shape = kinds[kind_index], shapes[kinds[kind_index]]
        i = level[layer][kind]
        step = (dropped[kind][i + 1] - dropped[kind][i]) * shape.out_features
        if skipped_total + step > budget:  # the last step, in part: whole channels closest to the budget
            extra = round((budget - skipped_total) / shape.out_features)
            channels[layer][kind] += extra
            skipped_total += extra * shape.out_features
            break
        level[layer][kind] = i + 1
        channels[layer][kind] = dropped[kind][i + 1]
        skipped_total += step
        if (p := price(layer, kind)) is not None:
            heapq.heappush(heap, p)
    layer_sparsity = tuple(
        {kind: n / shapes[kind].in_features for kind, n in per_layer.items()} for per_layer in channels
    )
    mean = {kind: sum(levels[kind] for levels in layer_sparsity) / max(1, len(layer_sparsity)) for kind in kinds}
    return SparsityPlan(target, mean, layer_sparsity, GREEDY)
