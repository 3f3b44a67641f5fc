"""LaRoSA sparsity plans: the parameter-weighted sparsity equals the target; reference ratios are kept."""

from __future__ import annotations

import pytest

from fusedserve.engine.larosa.sparsity import (
    MAX_MODULE_SPARSITY,
    ModuleShape,
    SparsityPlan,
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
