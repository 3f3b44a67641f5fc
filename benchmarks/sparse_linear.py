"""Where the top-k sparse linear beats dense: the break-even union of kept channels per batch size.

For SmolLM2-135M's four sparsified shapes, 30 copies each (one per layer, so weights stream from memory as in a
real decode step), time per batch size B and union fraction f:
- cpp: the C++ kernel's sparse path with bf16 tiles, as a mixed-precision model serves it (union of kept
  channels = f of the inputs, forced);
- torch: the pure-torch path (F.embedding_bag over W^T, reads k rows per token) for B = 1;
- dense: the engine's dense layer (DenseLinear with its default mixed precision) on the masked input.
Variants are interleaved round by round; ratios are medians of per-round ratios. The break-even fraction per
B (largest f where cpp is not slower than dense, interpolated, capped at 1.0) is the kernel's own limit: an upper
bound for kernels/sparse_linear.MAX_UNION_FRACTION_CPP, which holds what whole decode steps measured
(benchmarks/larosa.py). Writes docs/results/sparse_linear.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fusedserve.kernels.linear import DenseLinear
from fusedserve.kernels.sparse_linear import TopKSparseLinear, load_sparse_linear_extension

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): qkv, o, gate_up, down
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def inputs_with_union(batch: int, in_features: int, fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """x whose top-k sets (k = union size) cover exactly `fraction` of the inputs, the same set for every token."""
    union = max(1, round(fraction * in_features))
    x = torch.randn(batch, in_features, generator=gen) * 1e-3
    chosen = torch.randperm(in_features, generator=gen)[:union]
    x[:, chosen] = torch.randn(batch, union, generator=gen).sign() * (1 + torch.rand(batch, union, generator=gen))
    return x, union


def time_call(fn, reps: int) -> float:
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


def measure(batch: int, fraction: float, copies: int, rounds: int, gen: torch.Generator) -> dict[str, float]:
    layers, calls = [], {"cpp": [], "torch": [], "dense": []}
    for in_features, out_features in SHAPES:
        x, k = inputs_with_union(batch, in_features, fraction, gen)
        for _ in range(copies):
            weight = torch.randn(out_features, in_features, generator=gen)
            cpp = TopKSparseLinear(weight, None, k, backend="cpp", union_table={16: 2.0}, tile_dtype=torch.bfloat16)
            torch_layer = TopKSparseLinear(weight, None, k, backend="torch")
            layers.append((x, cpp, torch_layer, DenseLinear(weight)))
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        samples["cpp"].append(time_call(lambda: [c(x) for x, c, _, _ in layers], 1))
        if batch == 1:
            samples["torch"].append(time_call(lambda: [t(x) for x, _, t, _ in layers], 1))
        samples["dense"].append(time_call(lambda: [d(x) for x, _, _, d in layers], 1))
    row = {f"{name}_ms": 1e3 * statistics.median(v) for name, v in samples.items() if v}
    row["cpp_speedup"] = statistics.median(d / c for d, c in zip(samples["dense"], samples["cpp"], strict=True))
    if samples["torch"]:
        pairs = zip(samples["dense"], samples["torch"], strict=True)
        row["torch_speedup"] = statistics.median(d / t for d, t in pairs)
    return row


def break_even(rows: dict[float, dict[str, float]]) -> float:
    """Largest union fraction where cpp >= dense, by linear interpolation of speed-up; 1.0 if it always wins."""
    points = sorted(rows.items())
    if all(r["cpp_speedup"] >= 1.0 for _, r in points):
        return 1.0
    for (f0, r0), (f1, r1) in zip(points, points[1:], strict=False):
        if r0["cpp_speedup"] >= 1.0 > r1["cpp_speedup"]:
            return f0 + (f1 - f0) * (r0["cpp_speedup"] - 1.0) / (r0["cpp_speedup"] - r1["cpp_speedup"])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--fractions", default="0.3,0.5,0.7,0.85,1.0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse_linear.json")
    args = parser.parse_args()
    if load_sparse_linear_extension() is None:
        raise SystemExit("the C++ extension is unavailable (no compiler?): nothing to measure")
    gen = torch.Generator().manual_seed(0)
    results: dict[str, dict] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batches.split(",")):
            rows = {}
            for fraction in (float(f) for f in args.fractions.split(",")):
                rows[fraction] = row = measure(batch, fraction, args.copies, args.rounds, gen)
                extra = f"  torch x{row['torch_speedup']:.2f}" if "torch_speedup" in row else ""
                print(f"threads={threads} B={batch:2d} union={fraction:.2f}: dense {row['dense_ms']:7.2f} ms  "
                      f"cpp {row['cpp_ms']:7.2f} ms  x{row['cpp_speedup']:.2f}{extra}", flush=True)
            results[f"t{threads}_b{batch}"] = {"rows": {str(f): r for f, r in rows.items()},
                                               "break_even_union": break_even(rows)}
    print("break-even union fraction: " + ", ".join(f"{k} {v['break_even_union']:.2f}" for k, v in results.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Per batch size, the lower of the thread counts' break-even points: the kernel's limit at any thread count.
    batches = sorted({int(key.split("_b")[1]) for key in results})
    summary = {
        f"break_even_union_b{b}": min(v["break_even_union"] for k, v in results.items() if k.endswith(f"_b{b}"))
        for b in batches
    }
    report = {"summary": summary, "shapes_in_out": SHAPES, "copies": args.copies, "results": results}
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
