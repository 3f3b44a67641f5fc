"""Speed-up arithmetic, both readings: at Gstack's final loss (lower bound when scratch never gets there) and at
scratch's final loss (upper bound when Gstack never gets there)."""

from __future__ import annotations

import pytest

from fusedserve.engine.gstack.report import (
    CurvePoint,
    compute_speedup,
    flops_to_reach,
    speedup_at_scratch_loss,
)


def curve(*points: tuple[float, float]) -> list[CurvePoint]:
    return [CurvePoint(flops, 0, loss) for flops, loss in points]


def test_flops_to_reach_interpolates_between_evaluations() -> None:
    scratch = curve((0, 5.0), (100, 3.0), (200, 2.0))
    assert flops_to_reach(scratch, 2.5) == pytest.approx(150.0)
    assert flops_to_reach(scratch, 1.0) is None


def test_speedup_is_scratch_flops_to_gstack_loss_over_gstack_flops_minus_one() -> None:
    gstack = curve((0, 5.0), (100, 2.5))
    scratch = curve((0, 5.0), (100, 3.0), (200, 2.0))
    sp = compute_speedup(gstack, [scratch])
    assert sp.speedup == pytest.approx(0.5) and sp.bound == "exact"
    assert sp.scratch_flops == pytest.approx(150.0)


def test_speedup_uses_the_cheapest_scratch_curve_that_reaches_the_loss() -> None:
    gstack = curve((0, 5.0), (100, 2.5))
    longer = curve((0, 5.0), (300, 2.0))  # reaches 2.5 at 250
    shorter = curve((0, 5.0), (100, 2.8), (200, 2.4))  # reaches 2.5 at 175
    assert compute_speedup(gstack, [longer, shorter]).speedup == pytest.approx(0.75)


def test_speedup_is_flagged_a_lower_bound_when_scratch_never_gets_there() -> None:
    gstack = curve((0, 5.0), (100, 2.0))
    scratch = curve((0, 5.0), (120, 2.4))
    sp = compute_speedup(gstack, [scratch, []])
    assert sp.bound == "lower" and sp.speedup == pytest.approx(0.2) and sp.scratch_flops is None


def test_negative_speedup_when_scratch_is_ahead() -> None:
    gstack = curve((0, 5.0), (100, 3.0))
    scratch = curve((0, 5.0), (50, 3.0), (100, 2.5))
    assert compute_speedup(gstack, [scratch]).speedup == pytest.approx(-0.5)


def test_speedup_at_scratch_loss_is_scratch_budget_over_gstack_flops_to_that_loss() -> None:
    scratch = curve((0, 5.0), (200, 2.5))
    gstack = curve((0, 5.0), (100, 3.0), (150, 2.0), (200, 1.8))  # reaches 2.5 at 125
    sp = speedup_at_scratch_loss(gstack, scratch)
    assert sp.speedup == pytest.approx(200 / 125 - 1) and sp.bound == "exact"
    assert sp.gstack_flops == pytest.approx(125.0) and sp.target_loss == 2.5


def test_speedup_at_scratch_loss_is_an_upper_bound_when_gstack_never_gets_there() -> None:
    scratch = curve((0, 5.0), (200, 2.0))
    gstack = curve((0, 5.0), (250, 2.2))
    sp = speedup_at_scratch_loss(gstack, scratch)
    assert sp.bound == "upper" and sp.speedup == pytest.approx(200 / 250 - 1) and sp.gstack_flops is None
