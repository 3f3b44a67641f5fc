"""CPU decode attention: the shipped C++ kernel against the kernel it replaced and the per-sequence SDPA loop.

For SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head_dim 64), batch B in {1, 8, 32}, every
sequence at context C in {128, 512, 2048}, float32 and bfloat16 caches, time one decode-attention call:
- new: kernels/cpu/decode_attention.cpp as shipped (one pass, online softmax, AVX-512 / AMX, tokens split over
  threads);
- old: the kernel it replaced (two passes, scalar bf16 widening, one (sequence, kv head) per work item), built from
  git history (OLD_KERNEL_COMMIT) with the same compiler flags, so the package ships one kernel only;
- sdpa: kernels/attention.attend_each_sequence, the engine's pure-torch path (one SDPA call per sequence).
Calls rotate over disjoint slot ranges of caches that together hold --working-set-mib of K and V (well past the
last-level cache), as a real step's 30 layers stream from memory. Variants are interleaved round by round; each
reports its median call. GB/s = K and V bytes read per call / time. A "step" row times 30 calls at B=32, C=200
(one real serving step of the default model). `--threads 1 2` adds rows at 2 torch threads: run it with both cores
free, since while another process group keeps a core busy a descheduled OpenMP thread makes a call wait a whole
time slice (~8 ms medians on the development machine). Writes docs/results/decode_attention.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fusedserve.engine.model.default_model import cache_root
from fusedserve.kernels.attention import SlotBatch, attend_each_sequence
from fusedserve.kernels.cpu.extensions import _build, load_cpp_extension

HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
SCALE = HEAD_DIM**-0.5
OLD_KERNEL_COMMIT = "7dc19da"  # the last version of the two-pass kernel
KERNEL_PATH = "fusedserve/kernels/cpu/decode_attention.cpp"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_CALLS_PER_ROUND = 64


def build_old_kernel():
    """The replaced kernel, compiled like the shipped one (extensions._build: same flags, cached by source hash)."""
    source = subprocess.run(
        ["git", "show", f"{OLD_KERNEL_COMMIT}:{KERNEL_PATH}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = cache_root() / "benchmark_sources" / "decode_attention_old.cpp"  # module fusedserve_decode_attention_old
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return _build(path)


class Caches:
    """K and V pools of `mib` MiB each side, viewed as [slots, context, kv_heads, head_dim] per shape."""

    def __init__(self, dtype: torch.dtype, mib: int):
        elements = mib * 2**20 // 2 // (torch.finfo(dtype).bits // 8)
        gen = torch.Generator().manual_seed(0)
        self.k_pool = torch.randn(elements, generator=gen).to(dtype)
        self.v_pool = torch.randn(elements, generator=gen).to(dtype)

    def views(self, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Caches holding as many groups of `batch` slots as fit, and that group count."""
        per_slot = context * KV_HEADS * HEAD_DIM
        groups = self.k_pool.numel() // (per_slot * batch)
        if groups < 1:
            raise ValueError(f"batch {batch} x context {context} needs a larger --working-set-mib")
        shape = (groups * batch, context, KV_HEADS, HEAD_DIM)
        count = groups * batch * per_slot
        return self.k_pool[:count].view(shape), self.v_pool[:count].view(shape), groups


def measure(caches: Caches, kernels: dict, batch: int, context: int, rounds: int, calls: int) -> dict:
    """Median per-call seconds per variant (robust to the time slices other jobs take on a shared machine). Each
    (round, variant) reads its own window of slot groups, so no variant finds data another just pulled into cache."""
    k_cache, v_cache, groups = caches.views(batch, context)
    calls = min(groups, calls)
    windows = max(1, groups // calls)
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    query = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    slot_groups = [torch.arange(g * batch, (g + 1) * batch) for g in range(groups)]
    lens = torch.full((batch,), context, dtype=torch.long)
    batches = [SlotBatch.build(s.tolist(), [1] * batch, [context] * batch) for s in slot_groups]

    def kernel_call(kernel):
        return lambda g: kernel.decode_attention(query, k_cache, v_cache, slot_groups[g], lens, SCALE)

    def sdpa_call(g):
        out = torch.empty(batch, HEADS, HEAD_DIM)
        attend_each_sequence(query, k_cache, v_cache, batches[g], SCALE, out, skip_single_tokens=False)
        return out

    calls_by_name = {name: kernel_call(kernel) for name, kernel in kernels.items()} | {"sdpa": sdpa_call}
    reference = sdpa_call(0)
    errors = {name: (call(0) - reference).abs().max().item() for name, call in calls_by_name.items() if name != "sdpa"}
    samples: dict[str, list[float]] = {name: [] for name in calls_by_name}
    for round_index in range(rounds):
        for i, (name, call) in enumerate(calls_by_name.items()):
            first = (round_index * len(calls_by_name) + i) % windows * calls
            for g in range(first, first + calls):
                started = time.perf_counter()
                call(g)
                samples[name].append(time.perf_counter() - started)
    best = {name: statistics.median(times) for name, times in samples.items()}
    bytes_per_call = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
    row = {
        "threads": torch.get_num_threads(),
        "dtype": str(k_cache.dtype).removeprefix("torch."),
        "batch": batch,
        "context": context,
        "slot_groups": groups,
        "working_set_mib": round(groups * bytes_per_call / 2**20, 1),
        "bytes_per_call": bytes_per_call,
    }
    for name, seconds in best.items():
        row[f"{name}_us"] = round(seconds * 1e6, 1)
        row[f"{name}_gb_s"] = round(bytes_per_call / seconds / 1e9, 2)
    for name in calls_by_name:
        if name != "new":
            row[f"new_over_{name}_speedup"] = round(best[name] / best["new"], 2)
    row |= {f"{name}_max_abs_error_vs_sdpa": float(f"{error:.2e}") for name, error in errors.items()}
    return row


def summarize(rows: list[dict]) -> dict:
    """Per thread count: geometric-mean, min and max speed-ups over the grid, and the real step's milliseconds."""
    summary: dict[str, object] = {}
    for threads in sorted({row["threads"] for row in rows}):
        grid = [row for row in rows if row["threads"] == threads and not row.get("step")]
        part: dict[str, object] = {"shapes": len(grid)}
        for baseline in ("old", "sdpa"):
            key = f"new_over_{baseline}_speedup"
            speedups = [row[key] for row in grid if key in row]
            if speedups:
                part[f"{key}_geomean"] = round(math.exp(sum(map(math.log, speedups)) / len(speedups)), 2)
                part[f"{key}_min"], part[f"{key}_max"] = min(speedups), max(speedups)
        part["new_gb_s_max"] = max(row["new_gb_s"] for row in grid)
        for row in rows:
            if row["threads"] == threads and row.get("step"):
                for name in ("old", "new", "sdpa"):
                    if f"{name}_us" in row:
                        part[f"step_ms_{row['dtype']}_{name}"] = round(row[f"{name}_us"] * LAYERS / 1e3, 2)
        summary[f"threads_{threads}"] = part
    return summary


def print_row(row: dict) -> None:
    shape = f"{row['threads']:>2} {row['dtype']:>8} {row['batch']:>3} {row['context']:>5}"
    cells = [shape + (" step" if row.get("step") else "     ")]
    for name in ("old", "new", "sdpa"):
        cells.append(f"{row.get(f'{name}_us', math.nan):>9.1f} {row.get(f'{name}_gb_s', math.nan):>6.2f}")
    cells += [f"{row.get('new_over_old_speedup', math.nan):>6.2f}x", f"{row['new_over_sdpa_speedup']:>6.2f}x"]
    print("  ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="torch thread counts to run")
    parser.add_argument("--working-set-mib", type=int, default=768, help="K plus V bytes the calls rotate over")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-old", action="store_true", help="skip building and timing the replaced kernel")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_attention.json")
    args = parser.parse_args()
    kernels = {"new": load_cpp_extension("decode_attention.cpp")}
    if kernels["new"] is None:
        raise SystemExit("the C++ decode kernel did not build")
    if not args.no_old:
        kernels["old"] = build_old_kernel()
    print(f"working set {args.working_set_mib} MiB; times per call (one layer), GB/s of K and V read")
    print("th    dtype   B   ctx         old us   GB/s     new us   GB/s    sdpa us   GB/s  vs old  vs sdpa")
    rows = []
    for dtype_name in args.dtypes:
        caches = Caches(DTYPES[dtype_name], args.working_set_mib)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                for context in args.contexts:
                    rows.append(measure(caches, kernels, batch, context, args.rounds, MAX_CALLS_PER_ROUND))
                    print_row(rows[-1])
            rows.append(measure(caches, kernels, 32, 200, args.rounds, LAYERS) | {"step": True})
            print_row(rows[-1])
        del caches
    result = {
        "summary": summarize(rows),
        "config": {
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "working_set_mib": args.working_set_mib,
            "rounds": args.rounds,
            "old_kernel_commit": OLD_KERNEL_COMMIT,
            "cpu": platform.processor() or platform.machine(),
        },
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
