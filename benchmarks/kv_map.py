"""What KV page mapping costs at admission: page-at-a-time mapping against run mapping, side by side in one process.

The scheduler admits a burst (default: 32 requests x 135 prompt tokens arriving at once) on the default model's KV
shape (SmolLM2-135M: 30 layers, 3 KV heads x 64 dims; float32 and bfloat16) with the CPU defaults (per_layer, 32
KiB pages): can_admit + allocate_slot + reserve_tokens per request, as Scheduler._admit_waiting calls them. Variants:
- "page": VAttentionKVCache(map_runs=False), the path before run mapping: one pool page and one mmap per page and
  region, then mprotect + madvise(MADV_POPULATE_WRITE) over the run;
- "runs": the default: the pages a slot needs at once come from the pool as runs, one mmap (readable and writable
  at once) per physically consecutive run per region, then one madvise;
- the same two without prefault ("-nopf"): what mapping alone costs; the memory is then committed by the first
  write instead, which the "first write" column measures (one prefill's K/V rows per layer).
Two pool states: "fresh" (an empty cache) and "fragmented" (a tight budget filled by 128 short requests growing page by
page in turns, as decodes do, then a random half finished and their pages released: the burst maps into the holes;
both variants start from the identical state). Variants alternate within each round; medians over rounds.
Writes docs/results/kv_map.json (top-level "summary") and prints a table. A benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from fusedserve.engine.kv_cache import KVCacheSpec
from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
from fusedserve.engine.vattention.kv_cache import DEVICE_DEFAULTS, VAttentionKVCache

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M
MAX_MODEL_LEN = 8192
LAYOUT, PAGE = DEVICE_DEFAULTS["cpu"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
VARIANTS = {"page": (False, True), "runs": (True, True), "page-nopf": (False, False), "runs-nopf": (True, False)}
FILLERS, FILLER_TOKENS = 128, (20, 200)  # the fragmented case: short requests fill the budget first


def spec_for(dtype: torch.dtype, max_num_seqs: int) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, max_num_seqs, MAX_MODEL_LEN, KV_HEADS, HEAD_DIM, dtype)


def pages_for(tokens: int, dtype: torch.dtype) -> int:
    token_bytes = KV_HEADS * HEAD_DIM * torch.empty((), dtype=dtype).element_size()
    return -(-tokens * token_bytes // PAGE)


def make_cache(spec: KVCacheSpec, num_pages: int, map_runs: bool, prefault: bool) -> VAttentionKVCache:
    budget = num_pages * PAGE * 2 * spec.num_layers
    backend = CpuMemoryBackend(prefault=prefault)
    return VAttentionKVCache(spec, PAGE, budget, layout=LAYOUT, backend=backend, map_runs=map_runs)


def fragment(cache: VAttentionKVCache, lengths: list[int], seed: int) -> None:
    """Grow one slot per length a page at a time in turns, finish a random half and release their pages."""
    slots = [cache.allocate_slot() for _ in lengths]
    tokens_per_page = PAGE // (KV_HEADS * HEAD_DIM * cache.spec.dtype.itemsize)
    reached = [0] * len(slots)
    while any(r < n for r, n in zip(reached, lengths, strict=True)):
        for index, slot in enumerate(slots):
            if reached[index] < lengths[index]:
                reached[index] = min(lengths[index], reached[index] + tokens_per_page)
                if not cache.reserve_tokens(slot, reached[index]):
                    raise RuntimeError("the fragmenting phase ran out of pages")
    finished = random.Random(seed).sample(slots, len(slots) // 2)
    for slot in finished:
        cache.free_slot(slot)
    cache.release_idle_pages()


def admit_burst(cache: VAttentionKVCache, requests: int, prompt_tokens: int) -> tuple[list[int], float]:
    """The scheduler's admission of a burst: (slots, seconds)."""
    slots = []
    started = time.perf_counter()
    for _ in range(requests):
        if not cache.can_admit(prompt_tokens):
            raise RuntimeError("the burst does not fit the budget")
        slot = cache.allocate_slot()
        if slot is None or not cache.reserve_tokens(slot, prompt_tokens):
            raise RuntimeError("admission refused")
        slots.append(slot)
    return slots, time.perf_counter() - started


def first_write(cache: VAttentionKVCache, slots: list[int], prompt_tokens: int) -> float:
    """Seconds to write one prefill's K/V rows into every layer of each slot (what the model does next)."""
    started = time.perf_counter()
    for slot in slots:
        for layer in range(cache.spec.num_layers):
            cache.key_cache[layer][slot, :prompt_tokens] = 1.0
            cache.value_cache[layer][slot, :prompt_tokens] = 1.0
    return time.perf_counter() - started


def measure(case: str, dtype: torch.dtype, args: argparse.Namespace, round_index: int) -> dict[str, dict]:
    """One round: every variant admits the burst from the same pool state."""
    results = {}
    rng = random.Random(round_index)
    lengths = [rng.randint(*FILLER_TOKENS) for _ in range(FILLERS)] if case == "fragmented" else []
    order = list(VARIANTS) if round_index % 2 == 0 else list(reversed(VARIANTS))
    for name in order:
        map_runs, prefault = VARIANTS[name]
        if case == "fresh":
            spec = spec_for(dtype, args.requests)
            num_pages = 2 * args.requests * pages_for(args.prompt_tokens, dtype)
        else:  # exactly what the fillers need: the burst fits only into the holes their finished half leaves
            spec = spec_for(dtype, FILLERS)
            num_pages = sum(pages_for(n, dtype) for n in lengths)
        cache = make_cache(spec, num_pages, map_runs, prefault)
        try:
            free_runs = largest_free = None
            if case == "fragmented":
                fragment(cache, lengths, seed=round_index)
                free_runs, largest_free = cache.free_runs()
            calls_before, mapped_before = cache.stats.map_calls, cache.stats.pages_mapped
            vmas_before = cache.mapping_estimate()
            slots, seconds = admit_burst(cache, min(args.requests, cache.num_free_slots), args.prompt_tokens)
            results[name] = {
                "admit_ms": seconds * 1e3,
                "first_write_ms": first_write(cache, slots, args.prompt_tokens) * 1e3,
                "map_calls": cache.stats.map_calls - calls_before,
                "page_groups_mapped": cache.stats.pages_mapped - mapped_before,
                "bytes_mapped": cache.usage(0).bytes_mapped,
                "new_vmas_estimate": cache.mapping_estimate() - vmas_before,
                "free_runs_before": free_runs,
                "largest_free_run_before": largest_free,
                "requests": len(slots),
            }
        finally:
            cache.close()
    return results


def median_rows(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Per variant: medians (and bests) over rounds; counts that differ by round (fragmented) as medians too."""
    rows = {}
    for name in VARIANTS:
        samples = [r[name] for r in rounds]
        row = {key: samples[-1][key] for key in samples[-1]}
        for key in ("admit_ms", "first_write_ms", "map_calls", "new_vmas_estimate"):
            row[key] = round(statistics.median(s[key] for s in samples), 2)
            row[f"{key}_samples"] = [round(s[key], 2) for s in samples]
        row["admit_ms_best"] = min(row["admit_ms_samples"])
        row["admit_plus_write_ms"] = round(row["admit_ms"] + row["first_write_ms"], 2)
        row["same_pages_as_page_path"] = all(
            (s["bytes_mapped"], s["page_groups_mapped"]) == (r["page"]["bytes_mapped"], r["page"]["page_groups_mapped"])
            for s, r in zip(samples, rounds, strict=True)
        )
        rows[name] = row
    return rows


def paired_saving(old: dict, new: dict) -> float:
    """Median over rounds of old minus new admission time (the variants of a round ran back to back)."""
    pairs = zip(old["admit_ms_samples"], new["admit_ms_samples"], strict=True)
    return round(statistics.median(a - b for a, b in pairs), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=135)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--out", type=Path, default=Path("docs/results/kv_map.json"))
    args = parser.parse_args()

    cases = [(case, dtype) for dtype in args.dtypes for case in ("fresh", "fragmented")]
    rounds: dict[tuple[str, str], list] = {key: [] for key in cases}
    for round_index in tqdm(range(args.rounds), desc="rounds"):
        for case, dtype in cases:
            rounds[case, dtype].append(measure(case, DTYPES[dtype], args, round_index))
    results = {f"{case}/{dtype}": median_rows(rounds[case, dtype]) for case, dtype in cases}

    header = f"{'case':22} {'variant':10} {'admit ms':>9} {'write ms':>9} {'sum ms':>8} {'map calls':>9} {'pages':>6}"
    print(header)
    for key, rows in results.items():
        for name, row in rows.items():
            print(
                f"{key:22} {name:10} {row['admit_ms']:9.1f} {row['first_write_ms']:9.1f} "
                f"{row['admit_plus_write_ms']:8.1f} {row['map_calls']:9.0f} {row['page_groups_mapped']:6d}"
            )
    summary = {}
    for key, rows in results.items():
        old, new = rows["page"], rows["runs"]
        summary[key] = {
            "admit_ms_page_at_a_time": old["admit_ms"],
            "admit_ms_runs": new["admit_ms"],
            "admit_speedup": round(old["admit_ms"] / new["admit_ms"], 2),
            "admit_ms_best_page_at_a_time": old["admit_ms_best"],
            "admit_ms_best_runs": new["admit_ms_best"],
            "mapping_only_ms_page_at_a_time": rows["page-nopf"]["admit_ms"],
            "mapping_only_ms_runs": rows["runs-nopf"]["admit_ms"],
            "mapping_only_speedup": round(rows["page-nopf"]["admit_ms"] / rows["runs-nopf"]["admit_ms"], 2),
            "admit_ms_saved_paired": paired_saving(old, new),
            "mapping_only_ms_saved_paired": paired_saving(rows["page-nopf"], rows["runs-nopf"]),
            "map_calls_page_at_a_time": old["map_calls"],
            "map_calls_runs": new["map_calls"],
            "same_pages_and_bytes_mapped": all(row["same_pages_as_page_path"] for row in rows.values()),
        }
    print(json.dumps(summary, indent=1))
    report = {
        "summary": summary,
        "results": results,
        "config": {
            "model_shape": {"layers": LAYERS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM},
            "layout": LAYOUT,
            "page_size": PAGE,
            "requests": args.requests,
            "prompt_tokens": args.prompt_tokens,
            "rounds": args.rounds,
            "fragmented": {"fillers": FILLERS, "filler_tokens": FILLER_TOKENS, "finished": FILLERS // 2},
        },
        "notes": "admit_ms: can_admit + allocate_slot + reserve_tokens for the burst, median of rounds (best: "
        "admit_ms_best). '-nopf' variants skip prefault: what mapping alone costs. Their first write is slower by "
        "about what prefault cost, but it populates only the 4 KiB pages the prompt touches; prefault populates "
        "whole 32 KiB pages, whose rest the next decode tokens would fault in: totals are not comparable one to "
        "one. map_calls: mmap calls that back pages, over all regions (median of rounds). Page and byte counts "
        "are the same in every variant and round. This machine is shared and loaded: rounds vary up to 2x.",
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
