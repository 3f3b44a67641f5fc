"""Issue 3's benchmark: static vs vAttention KV memory under the same physical budget, on the real engine.

The default model (SmolLM2-135M-Instruct, float32 KV: 46,080 bytes per token) serves a realistic mix (prompts
16-2,000 tokens, outputs 16-512, log-uniform; kv_workload.request_mix) at max_model_len 8,192, greedy, EOS
ignored so every request produces its drawn length. Both backends get the same budget: the static cache turns it
into budget // (max_model_len x bytes per token) slots; vAttention reserves max_num_seqs slots virtually and maps
pages as tokens arrive. Reported side by side:
- peak physical KV bytes / peak live-token bytes (vAttention: mapped pages; the memfd's committed bytes too);
- the most requests held at once; output tokens/s over the whole run;
- time to map one page and pages mapped per step;
- an equal-batch check (vAttention limited to the static cache's slot count, runs alternated, best of each) that
  isolates vAttention's own overhead from the batching its memory savings allow.
Writes docs/results/kv_memory.json (top-level "summary") and kv_memory.png, prints a table. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_workload import request_mix  # noqa: E402

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig  # noqa: E402
from fusedserve.engine.llm_engine import LLMEngine, build_kv_cache, load_model_for_engine  # noqa: E402
from fusedserve.engine.model.default_model import ensure_default_model  # noqa: E402
from fusedserve.engine.observer import StepStats  # noqa: E402
from fusedserve.engine.sampling_params import SamplingParams  # noqa: E402
from fusedserve.engine.tokenizer import load_tokenizer  # noqa: E402
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache  # noqa: E402

MAX_MODEL_LEN = 8192
MIB = 1 << 20


@dataclass
class Trace:
    """What one run's observer saw, step by step."""

    times: list[float] = field(default_factory=list)
    mapped: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    live: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    pages_per_step: list[int] = field(default_factory=list)
    preemptions: int = 0


class TraceObserver:
    def __init__(self, engine_cache, started: float) -> None:
        self.cache, self.started, self.trace = engine_cache, started, Trace()
        self._pages_before = 0

    def on_step(self, stats: StepStats) -> None:
        usage, trace = stats.kv_usage, self.trace
        trace.times.append(time.perf_counter() - self.started)
        trace.mapped.append(usage.bytes_mapped)
        backend = getattr(self.cache, "backend", None)
        trace.committed.append(backend.committed_bytes() if hasattr(backend, "committed_bytes") else usage.bytes_mapped)
        trace.live.append(usage.bytes_live)
        trace.running.append(stats.num_running)
        trace.pages_per_step.append(usage.pages_mapped_total - self._pages_before)
        self._pages_before = usage.pages_mapped_total
        trace.preemptions += stats.num_preemptions

    def on_request_finished(self, request) -> None:
        return None


def run(model, tokenizer, model_dir: Path, backend: str, budget: int, max_num_seqs: int, mix) -> dict[str, object]:
    cache_config = CacheConfig(kv_backend=backend, kv_cache_memory=budget, kv_page_size=None)
    scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=2048)
    config = EngineConfig(ModelConfig(model_dir, "bench", dtype="auto"), cache_config, scheduler, threads=1)
    kv_cache = build_kv_cache(config, model)
    started = time.perf_counter()
    observer = TraceObserver(kv_cache, started)
    engine = LLMEngine(config, model, tokenizer, kv_cache, observer)
    for index, (prompt_len, output_len) in enumerate(mix):
        prompt = [(7 * index + 13 * j) % 40000 + 100 for j in range(prompt_len)]
        engine.add_request(f"r{index}", prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    outputs: dict[str, list[int]] = {}
    while engine.has_work:
        for output in engine.step():
            if output.error:
                raise RuntimeError(f"{output.request_id}: {output.error}")
            outputs.setdefault(output.request_id, []).extend(output.new_token_ids)
    seconds = time.perf_counter() - started
    trace = observer.trace
    result = summarize(backend, kv_cache, trace, seconds, sum(len(t) for t in outputs.values()))
    result["max_num_seqs"] = max_num_seqs if backend == "vattention" else kv_cache.spec.max_num_seqs
    result["trace"] = {k: getattr(trace, k) for k in ("times", "mapped", "committed", "live", "running")}
    result["tokens"] = outputs
    kv_cache.close()
    return result


def summarize(backend: str, kv_cache, trace: Trace, seconds: float, output_tokens: int) -> dict[str, object]:
    peak_live = max(trace.live)
    peak_step = max(range(len(trace.mapped)), key=lambda i: (trace.mapped[i], -i))
    row: dict[str, object] = {
        "backend": backend,
        "seconds": round(seconds, 1),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / seconds, 2),
        "max_running": max(trace.running),
        "preemptions": trace.preemptions,
        "peak_physical_mib": round(max(trace.mapped) / MIB, 1),
        "peak_committed_mib": round(max(trace.committed) / MIB, 1),
        "peak_live_mib": round(peak_live / MIB, 1),
        "peak_physical_over_peak_live": round(max(trace.mapped) / peak_live, 4),
        "physical_over_live_at_peak": round(trace.mapped[peak_step] / max(1, trace.live[peak_step]), 4),
        "committed_over_live_peak": round(max(trace.committed) / peak_live, 4),
        "mean_pages_mapped_per_step": round(statistics.mean(trace.pages_per_step), 2),
        "max_pages_mapped_per_step": max(trace.pages_per_step),
    }
    if isinstance(kv_cache, VAttentionKVCache):
        stats, regions = kv_cache.stats, kv_cache.plan.num_regions
        group_us = statistics.median(stats.map_seconds_per_page) * 1e6
        row |= {
            "layout": kv_cache.layout,
            "page_size": kv_cache.page_size,
            "map_page_group_us": round(group_us, 1),
            "map_page_us": round(group_us / regions, 2),
            "share_mapped_ahead": round(stats.pages_mapped_ahead / max(1, stats.pages_mapped), 3),
            "pages_moved": stats.pages_moved,
        }
    return row


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, running) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for name, result in results.items():
        trace = result["trace"]
        memory.plot(trace["times"], [m / MIB for m in trace["mapped"]], label=f"{name}: physical KV")
        memory.plot(trace["times"], [v / MIB for v in trace["live"]], linestyle="--", label=f"{name}: live tokens")
        running.plot(trace["times"], trace["running"], label=name)
    memory.set_ylabel("MiB")
    memory.set_title("KV memory under the same physical budget (SmolLM2-135M, max_model_len 8192)")
    memory.legend(fontsize=8)
    running.set_ylabel("requests held at once")
    running.set_xlabel("seconds")
    running.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--static-slots", type=int, default=2, help="the budget, in full-length static slots")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--equal-batch-requests", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("docs/results/kv_memory.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_dir = ensure_default_model()
    model = load_model_for_engine(model_dir, "auto", MAX_MODEL_LEN)
    tokenizer = load_tokenizer(model_dir)
    bytes_per_token = 2 * model.arch.num_layers * model.arch.num_kv_heads * model.arch.head_dim * 4
    budget = args.static_slots * MAX_MODEL_LEN * bytes_per_token
    mix = request_mix(args.requests)
    print(f"budget {budget / MIB:.0f} MiB = {args.static_slots} static slots; {args.requests} requests")
    results = {
        "static": run(model, tokenizer, model_dir, "static", budget, args.max_num_seqs, mix),
        "vattention": run(model, tokenizer, model_dir, "vattention", budget, args.max_num_seqs, mix),
    }
    # Different batch sizes: dtype "auto" computes in bf16, rounding by batch, so greedy tokens may differ here;
    # the equal-batch runs below must agree exactly.
    same_tokens = results["static"].pop("tokens") == results["vattention"].pop("tokens")
    equal = equal_batch(model, tokenizer, model_dir, budget, args.static_slots, mix[: args.equal_batch_requests])
    static, paged = results["static"], results["vattention"]
    summary = {
        "physical_over_live": paged["peak_physical_over_peak_live"],
        "concurrency_ratio": round(paged["max_running"] / static["max_running"], 2),
        "throughput_ratio": round(paged["output_tokens_per_s"] / static["output_tokens_per_s"], 3),
        "map_page_us": paged["map_page_us"],
        "throughput_ratio_equal_batch": equal["ratio"],
        "same_greedy_tokens_equal_batch": equal["same_greedy_tokens"],
        "same_greedy_tokens_same_budget": same_tokens,
    }
    columns = [
        "backend",
        "max_num_seqs",
        "max_running",
        "output_tokens_per_s",
        "peak_physical_mib",
        "peak_live_mib",
        "peak_physical_over_peak_live",
        "preemptions",
        "mean_pages_mapped_per_step",
        "seconds",
    ]
    print(" | ".join(columns))
    for result in results.values():
        print(" | ".join(str(result.get(c, "")) for c in columns))
    print(f"equal batch ({args.static_slots} at once): {equal}")
    print(f"summary: {summary}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(results, args.out.with_suffix(".png"))
    for result in results.values():
        trace = result.pop("trace")
        step = max(1, len(trace["times"]) // 400)  # keep the JSON small: about 400 points per run
        result["trace"] = {k: v[::step] for k, v in trace.items()}
    report = {
        "summary": summary,
        "budget_bytes": budget,
        "requests": mix,
        "runs": results,
        "equal_batch": equal,
        "notes": "static's physical bytes are its full reservation (what a GPU allocates); on a CPU the OS "
        "would commit only touched pages of torch.empty, but never give them back. Same-budget runs batch "
        "differently, and dtype auto computes in bf16 (rounding by batch), so greedy tokens may differ; "
        "the equal-batch runs compare tokens exactly.",
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def equal_batch(model, tokenizer, model_dir: Path, budget: int, slots: int, mix) -> dict[str, object]:
    """Both backends at the same concurrency (the static slot count), alternated twice, best throughput of each."""
    best = {"static": 0.0, "vattention": 0.0}
    tokens: dict[str, dict] = {}
    for _ in range(2):
        for backend in best:
            result = run(model, tokenizer, model_dir, backend, budget, slots, mix)
            best[backend] = max(best[backend], result["output_tokens_per_s"])
            tokens[backend] = result["tokens"]
    return {
        "static_tokens_per_s": best["static"],
        "vattention_tokens_per_s": best["vattention"],
        "ratio": round(best["vattention"] / best["static"], 3),
        "same_greedy_tokens": tokens["static"] == tokens["vattention"],
        "requests": len(mix),
        "concurrency": slots,
    }


if __name__ == "__main__":
    main()
