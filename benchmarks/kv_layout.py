"""Chooses vAttention's physical layout and default page size by measurement (docs/results/kv_layout.json).

Four measurements, side by side, on the default model's KV shape (SmolLM2-135M: 30 layers, 3 KV heads x 64):
1. page operations on the CPU backend per page size (16 KiB - 2 MiB): map + set access, the same with prefault
   (first touch), moving a populated page, unmap, punching the memory out;
2. a model-free replay of the engine (kv_workload.replay) over the realistic mix for each layout x page size x
   dtype: peak physical / live bytes, pages mapped per step, kernel VMAs;
3. kernel VMAs with every slot grown to max_model_len (interleaved), against vm.max_map_count;
4. attention over all layers reading K/V through the static cache and through each layout's per-layer views.
The choice rule is printed with the numbers. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_workload import count_vmas, replay, request_mix  # noqa: E402

from fusedserve.engine.kv_cache import KVCache, KVCacheSpec, StaticKVCache  # noqa: E402
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend  # noqa: E402
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache, max_map_count  # noqa: E402

KIB = 1024
PAGE_SIZES = [16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1024 * KIB, 2048 * KIB]
LAYOUTS = ["all_layers", "per_layer"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LAYERS, KV_HEADS, HEAD_DIM, HEADS = 30, 3, 64, 9  # SmolLM2-135M
MAX_NUM_SEQS, MAX_MODEL_LEN = 32, 8192
TARGET_RATIO, VMA_SHARE = 1.10, 0.10  # issue 3's physical/live target; a tenth of the VMA limit
READ_SLACK = 0.10  # decode attention may read K/V at most 10% slower than the static cache (best of rounds;
# this shared machine's run-to-run noise is 5-20%)


def spec_for(dtype: torch.dtype, max_num_seqs: int = MAX_NUM_SEQS) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, max_num_seqs, MAX_MODEL_LEN, KV_HEADS, HEAD_DIM, dtype)


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 2)


def page_operations(page: int, budget_bytes: int = 256 << 20) -> dict[str, float]:
    count = max(8, min(64, budget_bytes // page))
    timings: dict[str, list[float]] = {k: [] for k in ("map", "map_prefault", "move", "unmap", "discard")}
    for prefault in (False, True):
        backend = CpuMemoryBackend(prefault=prefault)
        base = backend.reserve(2 * count * page, page)
        pages = [backend.create_physical(page) for _ in range(count)]
        for index, handle in enumerate(pages):
            started = time.perf_counter()
            backend.map(base + index * page, page, handle)
            backend.set_access(base + index * page, page)
            timings["map_prefault" if prefault else "map"].append(time.perf_counter() - started)
        if prefault:  # populated pages: move each to the upper half, then unmap and punch it out
            for index, handle in enumerate(pages):
                started = time.perf_counter()
                backend.unmap(base + index * page, page)
                backend.map(base + (count + index) * page, page, handle)
                backend.set_access(base + (count + index) * page, page)
                timings["move"].append(time.perf_counter() - started)
            for index, handle in enumerate(pages):
                started = time.perf_counter()
                backend.unmap(base + (count + index) * page, page)
                timings["unmap"].append(time.perf_counter() - started)
                started = time.perf_counter()
                backend.discard(handle)
                timings["discard"].append(time.perf_counter() - started)
        backend.close()
    return {f"{name}_us": _median_us(values) for name, values in timings.items()}


def replay_row(layout: str, page: int, dtype_name: str, mix: list[tuple[int, int]]) -> dict[str, object]:
    spec = spec_for(DTYPES[dtype_name])
    cache = VAttentionKVCache(spec, page, None, layout=layout, backend=CpuMemoryBackend(prefault=False))
    result = replay(cache, mix, MAX_NUM_SEQS, MAX_MODEL_LEN, vma_every=4)
    stats = cache.stats
    cache.close()
    regions = 1 if layout == "all_layers" else 2 * LAYERS
    return {
        "layout": layout,
        "page_kib": page // KIB,
        "dtype": dtype_name,
        "peak_physical_over_peak_live": round(result.peak_mapped_bytes / result.peak_live_bytes, 4),
        "physical_over_live_at_peak": round(result.peak_mapped_over_live, 4),
        "mean_physical_over_live": round(result.mean_mapped_over_live, 4),
        "pages_mapped_per_step": round(stats.pages_mapped / result.steps, 2),
        "mmap_calls_per_step": round(stats.pages_mapped * regions / result.steps, 2),
        "share_mapped_ahead": round(stats.pages_mapped_ahead / max(1, stats.pages_mapped), 3),
        "max_vmas": result.max_vmas,
        "steps": result.steps,
        "replay_s": round(result.seconds, 2),
    }


def full_occupancy_vmas(layout: str, page: int, dtype: torch.dtype) -> dict[str, object]:
    """Every slot grown to max_model_len in interleaved 64-token steps; no memory is touched.

    The allocator refuses growth that could push its mappings past its share of vm.max_map_count; refusals
    are counted (in the engine they become preemptions).
    """
    spec = spec_for(dtype)
    cache = VAttentionKVCache(
        spec, page, None, layout=layout, backend=CpuMemoryBackend(prefault=False), map_ahead_tokens=0
    )
    baseline = count_vmas()
    slots = [cache.allocate_slot() for _ in range(MAX_NUM_SEQS)]
    refused = 0
    started = time.perf_counter()
    for length in range(64, MAX_MODEL_LEN + 1, 64):
        for slot in slots:
            refused += not cache.reserve_tokens(slot, length)
    row = {
        "layout": layout,
        "page_kib": page // KIB,
        "measured_vmas": count_vmas() - baseline,
        "allocator_estimate": cache._allocator.mapping_estimate(),
        "refused_growths": refused,
        "fill_s": round(time.perf_counter() - started, 2),
    }
    cache.close()
    return row


def _filled_caches(slots: int, context: int) -> dict[str, KVCache]:
    """The static cache (contiguous per-layer tensors) and each vAttention layout, filled to `context`."""
    spec = spec_for(torch.float32, max_num_seqs=slots)
    caches: dict[str, KVCache] = {"static": StaticKVCache(spec)}
    for layout in LAYOUTS:
        caches[layout] = VAttentionKVCache(spec, 2048 * KIB, None, layout=layout, watermark=0.0)
    for cache in caches.values():
        for _ in range(slots):
            slot = cache.allocate_slot()
            cache.reserve_tokens(slot, context)
            for layer in range(LAYERS):
                cache.key_cache[layer][slot, :context].normal_()
                cache.value_cache[layer][slot, :context].normal_()
    return caches


def attention_read(context: int, q_len: int, batch: int, rounds: int) -> dict[str, object]:
    """Best-of-rounds ms for attention over all 30 layers' [slot, :context] of `batch` slots, per cache layout.

    q_len 1 uses the engine's CPU decode kernel (all slots in one call) when it builds, else SDPA per slot;
    q_len > 1 uses SDPA per slot, as kernels/attention.py does. Caches alternate round by round.
    """
    from fusedserve.kernels.cpu.extensions import load_cpp_extension

    kernel = load_cpp_extension("decode_attention.cpp") if q_len == 1 else None
    caches = _filled_caches(batch, context)
    query = torch.randn(batch, HEADS, q_len, HEAD_DIM)
    slots, lens = torch.arange(batch), torch.full((batch,), context)
    samples: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(rounds):
        for name, cache in caches.items():
            started = time.perf_counter()
            for layer in range(LAYERS):
                k_cache, v_cache = cache.key_cache[layer], cache.value_cache[layer]
                if kernel is not None:
                    kernel.decode_attention(query[:, :, 0].contiguous(), k_cache, v_cache, slots, lens, 0.125)
                    continue
                for b in range(batch):
                    keys = k_cache[b, :context].transpose(0, 1).unsqueeze(0)
                    values = v_cache[b, :context].transpose(0, 1).unsqueeze(0)
                    F.scaled_dot_product_attention(query[b : b + 1], keys, values, enable_gqa=True)
            samples[name].append(time.perf_counter() - started)
    for cache in caches.values():
        cache.close()
    row: dict[str, object] = {
        "context": context,
        "q_len": q_len,
        "batch": batch,
        "kernel": "cpp_decode" if kernel is not None else "sdpa",
    }
    for name, values in samples.items():  # the minimum: other processes on the machine only ever add time
        row[f"{name}_ms"] = round(min(values) * 1e3, 2)
    for layout in LAYOUTS:
        row[f"{layout}_over_static"] = round(row[f"{layout}_ms"] / row["static_ms"], 3)
    return row


def choose(replays: list[dict], vmas: list[dict], reads: list[dict], ops: dict[int, dict]) -> dict[str, object]:
    """The CPU default. Among layouts x page sizes that
    (1) keep peak physical/live within the issue's target in both dtypes,
    (2) read K/V in decode (median over the decode shapes) at most READ_SLACK slower than the static cache,
    (3) fill every slot to max_model_len with no refused growth and under VMA_SHARE of vm.max_map_count,
    take the fewest mmap calls per step (float32); ties go to the lower ratio."""
    limit = max_map_count()
    decode_reads = [r for r in reads if r["q_len"] == 1]
    candidates = []
    for row in replays:
        if row["dtype"] != "float32":
            continue
        layout, page_kib = row["layout"], row["page_kib"]
        same = [r for r in replays if r["layout"] == layout and r["page_kib"] == page_kib]
        worst_ratio = max(r["peak_physical_over_peak_live"] for r in same)
        read = statistics.median(r[f"{layout}_over_static"] for r in decode_reads)  # robust to one outlier
        full = next(v for v in vmas if v["layout"] == layout and v["page_kib"] == page_kib)
        fits = full["refused_growths"] == 0 and full["measured_vmas"] <= VMA_SHARE * limit
        if worst_ratio <= TARGET_RATIO and read <= 1 + READ_SLACK and fits:
            candidates.append((row["mmap_calls_per_step"], row["peak_physical_over_peak_live"], row))
    if not candidates:
        raise RuntimeError("no layout/page size meets the rule")
    _, _, best = min(candidates, key=lambda c: (c[0], c[1]))
    page = best["page_kib"] * KIB
    return {
        "layout": best["layout"],
        "page_size": page,
        "rule": f"peak physical/live <= {TARGET_RATIO} (float32 and bfloat16), decode read <= "
        f"{1 + READ_SLACK:.2f}x static (median over decode shapes), full slots under {VMA_SHARE:.0%} of "
        f"vm.max_map_count ({limit}) with no refusal; then fewest mmap calls per step",
        "candidates": [(c[2]["layout"], c[2]["page_kib"], c[0]) for c in sorted(candidates, key=lambda c: c[0])],
        "peak_physical_over_peak_live_float32": best["peak_physical_over_peak_live"],
        "map_page_us": ops[page]["map_prefault_us"],
    }


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))


def _section(partial: Path, saved: dict, name: str, compute):
    """A finished section from an earlier (interrupted) run, or computed now and saved at once."""
    if name not in saved:
        saved[name] = compute()
        partial.write_text(json.dumps(saved))
    return saved[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("docs/results/kv_layout.json"))
    parser.add_argument("--resume", action="store_true", help="reuse sections an interrupted run finished")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial.json")
    saved = json.loads(partial.read_text()) if args.resume and partial.exists() else {}
    ops_rows = _section(
        partial,
        saved,
        "page_operations",
        lambda: [
            {"page_kib": page // KIB} | page_operations(page) for page in tqdm(PAGE_SIZES, desc="page operations")
        ],
    )
    print_table("page operations, CPU backend (median us per page)", ops_rows)
    ops = {row["page_kib"] * KIB: row for row in ops_rows}
    mix = request_mix(args.requests)
    configs = [(layout, page, dtype) for dtype in DTYPES for layout in LAYOUTS for page in PAGE_SIZES]
    replays = _section(
        partial,
        saved,
        "replay",
        lambda: [replay_row(layout, page, dtype, mix) for layout, page, dtype in tqdm(configs, desc="replays")],
    )
    print_table(f"engine replay: {args.requests} requests, {MAX_NUM_SEQS} slots x {MAX_MODEL_LEN} tokens", replays)
    fills = [(layout, page) for layout in LAYOUTS for page in PAGE_SIZES]
    vmas = _section(
        partial,
        saved,
        "full_occupancy_vmas",
        lambda: [full_occupancy_vmas(layout, page, torch.float32) for layout, page in tqdm(fills, desc="full slots")],
    )
    print_table(f"VMAs with every slot full (float32; vm.max_map_count = {max_map_count()})", vmas)
    shapes = ((512, 1, 8), (2048, 1, 8), (8192, 1, 2), (2048, 256, 1))
    reads = _section(
        partial,
        saved,
        "attention_read",
        lambda: [
            attention_read(context, q_len, batch, rounds=20) for context, q_len, batch in tqdm(shapes, desc="reads")
        ],
    )
    print_table("attention over all layers' K/V, static cache vs each layout (float32, 1 thread)", reads)
    choice = choose(replays, vmas, reads, ops)
    print(f"\nchoice: {choice}")
    report = {
        "choice": choice,
        "page_operations": ops_rows,
        "replay": replays,
        "full_occupancy_vmas": vmas,
        "attention_read": reads,
        "model_shape": {
            "layers": LAYERS,
            "kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_model_len": MAX_MODEL_LEN,
        },
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
