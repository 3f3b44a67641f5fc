"""Times Sampler.sample() for one decode step (B rows, the default model's vocabulary), variants side by side.

Variants, timed in turns in one process on the same logits and requests: `cpp` (the C++ row kernel), `torch`
(the pure-torch path, what runs without a compiler) and, with --baseline REV, `before` (the Sampler as it was at
git revision REV, loaded from git into private modules). Logits are either real (SmolLM2-135M-Instruct's
next-token logits over a few prompts, via transformers) or random N(0, 3^2), the flat worst case where top-p
nuclei hold thousands of tokens.

Prints a table per thread count and writes docs/results/sampler.json: "summary" (the serving mix, every request
T 0.8 / top_p 0.95 on model logits, per batch size and thread count) and "rows" (every mix x logits x batch x
threads). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from fusedserve.engine.request import Request
from fusedserve.engine.sampler import Sampler
from fusedserve.engine.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parent.parent
SERVING_MIX = "serving: T 0.8 / top_p 0.95"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was a",
    "The best way to learn",
    "User: What is 2+2?\nAssistant:",
    "import numpy as np\n",
    "In 1492, Columbus",
    "My favourite food is",
]


def model_logits(batch: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedserve.engine.model.default_model import ensure_default_model

    path = ensure_default_model()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
    rows = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            rows.append(model(ids).logits[0, -4:].float())  # the last 4 positions of each prompt
    pool = torch.cat(rows)
    return pool[torch.arange(batch) % len(pool)].contiguous()


def baseline_sampler(rev: str) -> type:
    """Sampler as of git revision `rev`: its sampler.py and sampler_blocks.py, loaded as private modules."""

    def load(path: str, name: str, renames: dict[str, str]) -> types.ModuleType:
        source = subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        for old, new in renames.items():
            source = source.replace(old, new)
        module = types.ModuleType(name)
        sys.modules[name] = module  # dataclasses look their module up
        exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)
        return module

    load("fusedserve/engine/sampler_blocks.py", "_baseline_sampler_blocks", {})
    sampler = load(
        "fusedserve/engine/sampler.py",
        "_baseline_sampler",
        {"fusedserve.engine.sampler_blocks": "_baseline_sampler_blocks"},
    )
    return sampler.Sampler


def mixes(batch: int) -> dict[str, list[SamplingParams]]:
    mixed = []
    for i in range(batch):
        kind = i % 8
        mixed.append(
            SamplingParams(
                temperature=[0.0, 1.0, 0.7, 0.8, 1.0, 0.6, 0.0, 0.9][kind],
                top_p=[1.0, 1.0, 0.9, 0.95, 1.0, 1.0, 1.0, 0.9][kind],
                top_k=[0, 0, 0, 0, 50, 0, 0, 40][kind],
                min_p=[0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0][kind],
                frequency_penalty=0.5 if kind in (1, 3) else 0.0,
                presence_penalty=0.3 if kind == 3 else 0.0,
                repetition_penalty=1.1 if kind == 5 else 1.0,
                logit_bias={10: 5.0, 11: -100.0} if kind == 6 else {},
                logprobs=5 if kind in (2, 6) else None,
                seed=i if kind in (1, 7) else None,
            )
        )
    return {
        SERVING_MIX: [SamplingParams(temperature=0.8, top_p=0.95) for _ in range(batch)],
        "greedy": [SamplingParams(temperature=0.0) for _ in range(batch)],
        "temperature 1.0": [SamplingParams(temperature=1.0) for _ in range(batch)],
        "top_p 0.9 / T 0.7": [SamplingParams(temperature=0.7, top_p=0.9) for _ in range(batch)],
        "mixed": mixed,
    }


def time_variants(
    samplers: dict[str, Callable[[], Sampler]],
    logits: torch.Tensor,
    params: list[SamplingParams],
    steps: int,
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """Median wall and thread-CPU milliseconds per sample() call of each variant. The steps are split into rounds
    that visit every variant in turn (a busy machine slows them alike); each visit starts with two untimed steps,
    so that one variant's leftovers (OpenMP workers still spinning, cold caches) are not charged to the next."""
    prompt = list(range(100, 600))  # 500 prompt tokens
    runs = {}
    for name, make in samplers.items():
        requests = [
            Request(f"r{i}", prompt, p, 4096, output_token_ids=list(range(700, 900))) for i, p in enumerate(params)
        ]
        runs[name] = (make(), requests)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (sampler, requests) in runs.items():
            for step in range(2 + -(-steps // rounds)):
                start_wall, start_cpu = time.perf_counter(), time.thread_time()
                sampler.sample(logits, requests)
                if step >= 2:
                    wall[name].append(time.perf_counter() - start_wall)
                    cpu[name].append(time.thread_time() - start_cpu)
    return {
        name: {"wall_ms": statistics.median(wall[name]) * 1e3, "cpu_ms": statistics.median(cpu[name]) * 1e3}
        for name in runs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts")
    parser.add_argument(
        "--all-mixes-threads",
        type=int,
        default=1,
        help="the thread count at which every mix is timed (the others time the serving mix)",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--baseline", default=None, help="git revision whose Sampler is timed as `before`")
    parser.add_argument("--out", default="docs/results/sampler.json")
    args = parser.parse_args()
    pool = model_logits(max(args.batches))
    sources = {"model": pool, "random": torch.randn(pool.shape, generator=torch.Generator().manual_seed(0)) * 3}
    vocab = pool.shape[1]

    samplers: dict[str, Callable[[], Sampler]] = {}
    if args.baseline:
        before = baseline_sampler(args.baseline)
        samplers["before"] = lambda: before(vocab, eos_token_ids=[2], seed=0)
    samplers["torch"] = lambda: Sampler(vocab, eos_token_ids=[2], seed=0, use_kernel=False)
    samplers["cpp"] = lambda: Sampler(vocab, eos_token_ids=[2], seed=0)
    if not samplers["cpp"]().uses_kernel:
        del samplers["cpp"]
        print("the C++ sampler kernel is unavailable: timing the torch path only")

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(
            f"\nSampler.sample(), V={vocab}, {threads} torch thread(s), median wall ms per step "
            f"({' / '.join(samplers)}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        print(f"{'mix':28s} {'B':>3s} {'model logits':>26s} {'random logits':>26s}")
        for batch in args.batches:
            for mix, params in mixes(batch).items():
                if mix != SERVING_MIX and threads != args.all_mixes_threads:
                    continue
                cells = []
                for source, logits in sources.items():
                    timing = time_variants(samplers, logits[:batch].contiguous(), params, args.steps)
                    rows.append(
                        {
                            "mix": mix,
                            "logits": source,
                            "batch": batch,
                            "threads": threads,
                            "vocab": vocab,
                            "load_average": os.getloadavg()[0],
                            **{f"{name}_{key}": value for name, t in timing.items() for key, value in t.items()},
                        }
                    )
                    cells.append(" / ".join(f"{t['wall_ms']:.2f}" for t in timing.values()))
                print(f"{mix:28s} {batch:3d} {cells[0]:>26s} {cells[1]:>26s}")

    serving = [r for r in rows if r["mix"] == SERVING_MIX and r["logits"] == "model"]
    summary = {
        "what": f"Sampler.sample() wall ms per decode step, every request {SERVING_MIX}, SmolLM2 logits",
        "variants": {
            "before": f"Sampler at git {args.baseline}" if args.baseline else None,
            "torch": "pure-torch path (no compiler / FUSEDSERVE_NO_CPP_KERNELS=1)",
            "cpp": "C++ row kernel (fusedserve/kernels/cpu/sampler.cpp)",
        },
        "steps": [
            {
                "batch": r["batch"],
                "threads": r["threads"],
                "load_average": round(r["load_average"], 1),
                **{f"{name}_wall_ms": round(r[f"{name}_wall_ms"], 3) for name in samplers},
            }
            for r in serving
        ],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
