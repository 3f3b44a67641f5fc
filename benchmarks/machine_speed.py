"""How fast this machine is right now, so a benchmark's absolute numbers can be read against another day's.

The machine is a shared VM: the same code runs at very different speeds from hour to hour. Ratios measured side by
side stay meaningful; absolute numbers (tokens/s) do not, unless they travel with a measure of the machine at
the time. This takes about a second: a bf16 and an fp32 2048^3 matmul (the brief measured ~2 and ~0.2 TFLOP/s
here) and a large memory copy (~36 GB/s read+write), plus the share of CPU time the hypervisor stole meanwhile.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# What the project brief measured on this machine class, for reading today's numbers against.
BRIEF_REFERENCE = {"bf16_matmul_tflops": 2.0, "fp32_matmul_tflops": 0.2, "copy_gb_s": 36.0}


@dataclass
class MachineSpeed:
    bf16_matmul_tflops: float
    fp32_matmul_tflops: float
    copy_gb_s: float  # bytes read + written per second
    steal_percent: float  # CPU time the hypervisor took from this VM during the measurement, % of all cores

    def as_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call packing and page faults are not the machine's speed
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _steal_ticks() -> int | None:
    stat = Path("/proc/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().splitlines()[0].split()
    return int(fields[8]) if len(fields) > 8 else None


def measure_machine(threads: int | None = None) -> MachineSpeed:
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        steal_before, wall_before = _steal_ticks(), time.perf_counter()
        n = 2048
        flops = 2.0 * n**3
        a16, b16 = torch.randn(n, n).bfloat16(), torch.randn(n, n).bfloat16()
        bf16 = flops / _best_seconds(lambda: a16 @ b16, repeats=5) / 1e12
        a32, b32 = torch.randn(n, n), torch.randn(n, n)
        fp32 = flops / _best_seconds(lambda: a32 @ b32, repeats=2) / 1e12
        source = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB: well past the caches
        target = torch.empty_like(source)
        copy = 2 * source.numel() * 4 / _best_seconds(lambda: target.copy_(source), repeats=5) / 1e9
        steal = 0.0
        steal_after = _steal_ticks()
        if steal_before is not None and steal_after is not None:
            elapsed = time.perf_counter() - wall_before
            ticks_per_s = os.sysconf("SC_CLK_TCK")
            steal = 100.0 * (steal_after - steal_before) / ticks_per_s / elapsed / (os.cpu_count() or 1)
        return MachineSpeed(bf16, fp32, copy, steal)
    finally:
        torch.set_num_threads(previous_threads)


if __name__ == "__main__":
    speed = measure_machine()
    print(speed.as_dict(), "brief:", BRIEF_REFERENCE)
