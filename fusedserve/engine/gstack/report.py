"""Turn the experiment's training logs into curves, the Gstack speed-up, a JSON record and plots.

Speed-up (Du et al.): sp = F_scratch / F_gstack - 1, where F_gstack is Gstack's total FLOPs (base phase
included) and F_scratch the FLOPs the from-scratch model needs to reach Gstack's final held-out loss, read off
the scratch held-out curve(s) by linear interpolation between evaluations. If no scratch curve reaches that
loss, sp is only a lower bound (longest scratch run's FLOPs / F_gstack - 1) and is flagged so.
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
    lower_bound: bool  # True: scratch never reached the target loss, the true sp is at least `speedup`
    target_loss: float
    gstack_flops: float
    scratch_flops_to_target: float | None


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
    target, gstack_flops = gstack[-1].heldout_loss, gstack[-1].flops
    reached = [f for f in (flops_to_reach(c, target) for c in scratch_curves if c) if f is not None]
    if reached:
        needed = min(reached)
        return Speedup(needed / gstack_flops - 1.0, False, target, gstack_flops, needed)
    longest = max(c[-1].flops for c in scratch_curves if c)
    return Speedup(longest / gstack_flops - 1.0, True, target, gstack_flops, None)


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
