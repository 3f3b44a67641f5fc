"""Speed-up arithmetic: interpolating scratch's curve to Gstack's final loss, and the lower-bound case."""

from __future__ import annotations

import pytest

from fusedserve.engine.gstack.report import CurvePoint, compute_speedup, flops_to_reach


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
    assert sp.speedup == pytest.approx(0.5) and not sp.lower_bound
    assert sp.scratch_flops_to_target == pytest.approx(150.0)


def test_speedup_uses_the_cheapest_scratch_curve_that_reaches_the_loss() -> None:
    gstack = curve((0, 5.0), (100, 2.5))
    longer = curve((0, 5.0), (300, 2.0))  # reaches 2.5 at 250
    shorter = curve((0, 5.0), (100, 2.8), (200, 2.4))  # reaches 2.5 at 175
    assert compute_speedup(gstack, [longer, shorter]).speedup == pytest.approx(0.75)


def test_speedup_is_flagged_a_lower_bound_when_scratch_never_gets_there() -> None:
    gstack = curve((0, 5.0), (100, 2.0))
    scratch = curve((0, 5.0), (120, 2.4))
    sp = compute_speedup(gstack, [scratch, []])
    assert sp.lower_bound and sp.speedup == pytest.approx(0.2) and sp.scratch_flops_to_target is None


def test_negative_speedup_when_scratch_is_ahead() -> None:
    gstack = curve((0, 5.0), (100, 3.0))
    scratch = curve((0, 5.0), (50, 3.0), (100, 2.5))
    assert compute_speedup(gstack, [scratch]).speedup == pytest.approx(-0.5)
