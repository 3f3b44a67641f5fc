"""LaRoSA sparsity plans: the parameter-weighted sparsity equals the target, for the fixed-ratio plan (reference
ratios kept) and the greedy per-layer allocation (monotone, capped, less sparsity where the error is higher)."""

from __future__ import annotations

import pytest

from fusedserve.engine.larosa.sensitivity import sparsity_grid
from fusedserve.engine.larosa.sparsity import (
    GREEDY,
    MAX_MODULE_SPARSITY,
    SPARSE_MODULES,
    ModuleShape,
    SparsityPlan,
    allocate_greedy,
    kept_channels,
    plan_sparsity,
)

SMOLLM2 = {
    "qkv_proj": ModuleShape(576, 960),
    "o_proj": ModuleShape(576, 576),
    "gate_up_proj": ModuleShape(576, 3072),
    "down_proj": ModuleShape(1536, 576),
}


@pytest.mark.parametrize("target", [0.25, 0.4, 0.5, 0.7])
def test_parameter_weighted_sparsity_equals_target(target: float) -> None:
    plan = plan_sparsity(SMOLLM2, target)
    total = sum(s.params for s in SMOLLM2.values())
    weighted = sum(plan.module_sparsity[k] * s.params for k, s in SMOLLM2.items()) / total
    assert weighted == pytest.approx(target, abs=1e-9)
    assert plan.achieved(SMOLLM2) == pytest.approx(target, abs=2e-3)  # k rounded to whole channels


def test_residual_inputs_are_sparsified_less_than_o_and_down_inputs_in_ratio_2_to_3() -> None:
    plan = plan_sparsity(SMOLLM2, 0.4).module_sparsity
    assert plan["qkv_proj"] == pytest.approx(plan["gate_up_proj"])
    assert plan["o_proj"] / plan["qkv_proj"] == pytest.approx(1.5)


def test_high_targets_cap_modules_and_still_hit_the_target() -> None:
    plan = plan_sparsity(SMOLLM2, 0.85)
    assert max(plan.module_sparsity.values()) == pytest.approx(MAX_MODULE_SPARSITY)
    total = sum(s.params for s in SMOLLM2.values())
    assert sum(plan.module_sparsity[k] * s.params for k, s in SMOLLM2.items()) / total == pytest.approx(0.85)
    with pytest.raises(ValueError):
        plan_sparsity(SMOLLM2, 0.96)


def test_zero_sparsity_keeps_every_module_dense() -> None:
    plan = plan_sparsity(SMOLLM2, 0.0)
    assert all(plan.kept(kind, s.in_features) is None for kind, s in SMOLLM2.items())


def test_plan_round_trips_through_json_and_rounds_k() -> None:
    plan = plan_sparsity(SMOLLM2, 0.5)
    assert SparsityPlan.from_json(plan.to_json()) == plan
    assert kept_channels(0.5, 576) == 288
    assert kept_channels(0.999, 10) == 1


GRID = sparsity_grid()


def convex_errors(scales: list[dict[str, float]]) -> list[dict[str, list[float]]]:
    """Error curves scale * s^2 per (layer, module): the shape top-k errors have (dropping small inputs first)."""
    return [{kind: [layer[kind] * s * s for s in GRID] for kind in SPARSE_MODULES} for layer in scales]


def varied_errors(num_layers: int = 6) -> list[dict[str, list[float]]]:
    return convex_errors(
        [{kind: (1 + layer) * (1 + i) ** 1.5 for i, kind in enumerate(SPARSE_MODULES)} for layer in range(num_layers)]
    )


def half_channel_tolerance(num_layers: int) -> float:
    total = sum(s.params for s in SMOLLM2.values()) * num_layers
    return max(s.out_features for s in SMOLLM2.values()) / 2 / total


@pytest.mark.parametrize("target", [0.1, 0.25, 0.4, 0.5, 0.7, 0.9])
def test_greedy_average_sparsity_equals_target_in_whole_channels(target: float) -> None:
    plan = allocate_greedy(SMOLLM2, GRID, varied_errors(), target)
    assert plan.allocation == GREEDY and len(plan.layer_sparsity) == 6
    assert plan.achieved(SMOLLM2) == pytest.approx(target, abs=half_channel_tolerance(6))
    for levels in plan.layer_sparsity:  # every level is a whole number of channels
        for kind, s in levels.items():
            assert s * SMOLLM2[kind].in_features == pytest.approx(round(s * SMOLLM2[kind].in_features), abs=1e-9)


def test_greedy_levels_are_monotone_in_the_target() -> None:
    errors = varied_errors()
    plans = [allocate_greedy(SMOLLM2, GRID, errors, t) for t in (0.0, 0.1, 0.25, 0.4, 0.41, 0.5, 0.7, 0.94)]
    for lower, higher in zip(plans, plans[1:], strict=False):
        for low, high in zip(lower.layer_sparsity, higher.layer_sparsity, strict=True):
            assert all(low[kind] <= high[kind] for kind in SPARSE_MODULES)


def test_greedy_never_exceeds_the_module_cap() -> None:
    plan = allocate_greedy(SMOLLM2, GRID, varied_errors(), 0.94)
    assert max(s for levels in plan.layer_sparsity for s in levels.values()) <= MAX_MODULE_SPARSITY
    with pytest.raises(ValueError):
        allocate_greedy(SMOLLM2, GRID, varied_errors(), MAX_MODULE_SPARSITY)
    with pytest.raises(ValueError):
        allocate_greedy(SMOLLM2, [0.0, 0.5, 0.99], varied_errors(), 0.4)


def test_greedy_gives_the_module_with_higher_error_less_sparsity() -> None:
    even = {kind: 1.0 for kind in SPARSE_MODULES}
    plan = allocate_greedy(SMOLLM2, GRID, convex_errors([even, {**even, "gate_up_proj": 4.0}, even]), 0.4)
    sensitive, others = plan.layer_sparsity[1]["gate_up_proj"], plan.layer_sparsity[0]["gate_up_proj"]
    assert sensitive < others and others == plan.layer_sparsity[2]["gate_up_proj"]


def test_greedy_plan_round_trips_and_serves_each_layer_its_own_k() -> None:
    plan = allocate_greedy(SMOLLM2, GRID, varied_errors(), 0.5)
    assert SparsityPlan.from_json(plan.to_json()) == plan
    for layer, levels in enumerate(plan.layer_sparsity):
        for kind, s in levels.items():
            expected = None if s == 0 else SMOLLM2[kind].in_features - round(s * SMOLLM2[kind].in_features)
            assert plan.kept(kind, SMOLLM2[kind].in_features, layer) == expected
    mean = sum(levels["down_proj"] for levels in plan.layer_sparsity) / 6
    assert plan.module_sparsity["down_proj"] == pytest.approx(mean)  # what a per-kind reader serves


def test_plans_written_before_per_layer_levels_still_load() -> None:
    old = {"target": 0.4, "module_sparsity": {"qkv_proj": 0.3, "o_proj": 0.5, "gate_up_proj": 0.3, "down_proj": 0.5}}
    plan = SparsityPlan.from_json(old)
    assert plan.allocation == "fixed-ratio" and plan.layer_sparsity == ()
    assert plan.kept("o_proj", 576, layer=7) == plan.kept("o_proj", 576) == 288
