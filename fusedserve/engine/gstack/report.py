"""Turn the experiment's training logs into curves, the Gstack speed-up, a JSON record and plots.

Speed-up sp = F_scratch / F_gstack - 1 at equal held-out loss, read two ways (losses interpolated linearly
between evaluations; F_gstack counts the base phase):
- at scratch's loss (`speedup_at_scratch_loss`, Du et al.'s reading: the scratch model trained on its whole
  budget, and the FLOPs Gstack needs to reach the loss it ends at). If Gstack never gets there, sp computed from
  Gstack's final FLOPs is only an upper bound.
- at Gstack's loss (`compute_speedup`): the FLOPs scratch (or a longer scratch run) needs to reach Gstack's final
  loss. If no scratch curve gets there, sp from the longest scratch run is only a lower bound.
This module never trains.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class CurvePoint:
    flops: float
    tokens: int
    heldout_loss: float


@dataclass(frozen=True)
class Speedup:
    speedup: float
    bound: str  # "exact"; "lower": the true sp is at least `speedup`; "upper": at most `speedup`
    target_loss: float
    gstack_flops: float | None  # Gstack's FLOPs at the target loss (None: never reached)
    scratch_flops: float | None  # scratch's FLOPs at the target loss (None: never reached)


def read_curve(run_dir: Path, flops_offset: float = 0.0, tokens_offset: int = 0) -> list[CurvePoint]:
    """Held-out evaluations of one training run, shifted by the FLOPs/tokens spent before it."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [
        CurvePoint(e["flops"] + flops_offset, e["tokens"] + tokens_offset, e["heldout_loss"])
        for e in entries
        if e.get("heldout_loss") is not None
    ]


def flops_to_reach(curve: list[CurvePoint], target: float) -> float | None:
    """First FLOPs at which the curve's held-out loss is <= target, interpolated linearly; None if never."""
    for i, point in enumerate(curve):
        if point.heldout_loss <= target:
            if i == 0:
                return point.flops
            prev = curve[i - 1]
            frac = (prev.heldout_loss - target) / (prev.heldout_loss - point.heldout_loss)
            return prev.flops + frac * (point.flops - prev.flops)
    return None


def compute_speedup(gstack: list[CurvePoint], scratch_curves: list[list[CurvePoint]]) -> Speedup:
    """sp at Gstack's final loss: the cheapest scratch curve's FLOPs to get there over Gstack's FLOPs."""
    target, gstack_flops = gstack[-1].heldout_loss, gstack[-1].flops
    reached = [f for f in (flops_to_reach(c, target) for c in scratch_curves if c) if f is not None]
    if reached:
        needed = min(reached)
        return Speedup(needed / gstack_flops - 1.0, "exact", target, gstack_flops, needed)
    longest = max(c[-1].flops for c in scratch_curves if c)
    return Speedup(longest / gstack_flops - 1.0, "lower", target, gstack_flops, None)


def speedup_at_scratch_loss(gstack: list[CurvePoint], scratch: list[CurvePoint]) -> Speedup:
    """sp at scratch's final loss: scratch's whole budget over the FLOPs Gstack needs to reach that loss."""
    target, scratch_flops = scratch[-1].heldout_loss, scratch[-1].flops
    needed = flops_to_reach(gstack, target)
    if needed is None:  # Gstack ends above scratch: it would need more than all its FLOPs
        return Speedup(scratch_flops / gstack[-1].flops - 1.0, "upper", target, None, scratch_flops)
    return Speedup(scratch_flops / needed - 1.0, "exact", target, needed, scratch_flops)


def curve_json(curve: list[CurvePoint]) -> list[dict]:
    return [asdict(p) for p in curve]


def plot_curves(curves: dict[str, list[CurvePoint]], path: Path, title: str, zoom: bool) -> None:
    """Held-out loss against training FLOPs, one line per run (log FLOPs axis; zoom: linear, last 70%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        points = [p for p in curve if p.flops > 0]
        ax.plot([p.flops for p in points], [p.heldout_loss for p in points], label=name, marker=".", ms=3)
    finals = [c[-1].heldout_loss for c in curves.values() if c]
    if zoom and finals:
        longest = max(c[-1].flops for c in curves.values() if c)
        ax.set_xlim(0.3 * longest, 1.02 * longest)
        ax.set_ylim(min(finals) - 0.03, min(finals) + 0.45)
    if not zoom:
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (6 x params x tokens, base phase included)")
    ax.set_ylabel("held-out loss (nats / byte)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
