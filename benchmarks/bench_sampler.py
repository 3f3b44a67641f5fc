"""Times Sampler.sample() for one decode step (B rows, the default model's vocabulary) on one CPU thread.

Prints a table of batch mixes x logits sources and writes docs/results/sampler.json. Logits are either real
(SmolLM2-135M-Instruct's next-token logits over a few prompts, via transformers) or random N(0, 3^2), the
flat worst case where top-p nuclei hold thousands of tokens. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fusedserve.engine.request import Request
from fusedserve.engine.sampler import Sampler
from fusedserve.engine.sampling_params import SamplingParams

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
        "greedy": [SamplingParams(temperature=0.0) for _ in range(batch)],
        "temperature 1.0": [SamplingParams(temperature=1.0) for _ in range(batch)],
        "top_p 0.9 / T 0.7": [SamplingParams(temperature=0.7, top_p=0.9) for _ in range(batch)],
        "mixed": mixed,
    }


def time_mix(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], steps: int) -> dict[str, float]:
    """Median wall and thread-CPU milliseconds per sample() call (CPU time is less hurt by a busy machine)."""
    prompt = list(range(100, 600))  # 500 prompt tokens
    requests = [Request(f"r{i}", prompt, p, 4096, output_token_ids=list(range(700, 900))) for i, p in
                enumerate(params)]
    for _ in range(3):
        sampler.sample(logits, requests)
    wall, cpu = [], []
    for _ in range(steps):
        start_wall, start_cpu = time.perf_counter(), time.thread_time()
        sampler.sample(logits, requests)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.thread_time() - start_cpu)
    return {"wall_ms": statistics.median(wall) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="docs/results/sampler.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sources = {"model": model_logits(args.batch)}
    sources["random"] = (
        torch.randn(args.batch, sources["model"].shape[1], generator=torch.Generator().manual_seed(0)) * 3
    )
    vocab = sources["model"].shape[1]
    sampler = Sampler(vocab, eos_token_ids=[2], seed=0)
    results = []
    print(f"Sampler.sample(), B={args.batch}, V={vocab}, 1 thread, median ms per step (wall / thread CPU); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'mix':20s} {'model logits':>16s} {'random logits':>16s}")
    for name, params in mixes(args.batch).items():
        row = {src: time_mix(sampler, logits, params, args.steps) for src, logits in sources.items()}
        results.append({"mix": name, "batch": args.batch, "vocab": vocab, "load_average": os.getloadavg()[0],
                        **{f"{src}_{k}": v for src, t in row.items() for k, v in t.items()}})
        cells = [f"{t['wall_ms']:7.2f} / {t['cpu_ms']:5.2f}" for t in row.values()]
        print(f"{name:20s} {cells[0]:>16s} {cells[1]:>16s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
