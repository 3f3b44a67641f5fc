"""Serving benchmark: fusedserve vs a plain transformers baseline (or any OpenAI-compatible base URL).

For each server and each concurrency (default 1, 8, 32) it streams completions with a fixed output length
(ignore_eos + min_tokens) from real-text prompts of about 120 tokens, and reports requests/s, output tokens/s and
TTFT / inter-token latency p50 and p99. The same workload also runs on the engine alone ("engine-only", see
engine_replay.py), which splits any gap into engine cost and serving cost. Everything in one run, side by side,
because this machine is shared and noisy; the machine's own speed is measured before and after
(machine_speed.py) so absolute numbers can be read against another day's. Writes docs/results/serve_bench.json
(top-level "summary") and a PNG, and prints a table.

    python benchmarks/serve_bench.py                       # fusedserve + the transformers baseline
    python benchmarks/serve_bench.py --base-url URL --model NAME --no-fusedserve --no-baseline
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_replay import replay  # noqa: E402
from machine_speed import BRIEF_REFERENCE, measure_machine  # noqa: E402
from server_process import running_server  # noqa: E402

from fusedserve.clients.loadgen import LoadResult, run_load  # noqa: E402
from fusedserve.engine.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
PROMPT_CHARS = 560  # about 120 SmolLM2 tokens of English prose


def real_text_prompts(count: int) -> list[str]:
    """Module docstrings of the CPython standard library (real English prose on every machine), cut to size."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prompts: list[str] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(errors="ignore")))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) >= PROMPT_CHARS:
            prompts.append(" ".join(doc.split())[:PROMPT_CHARS])
        if len(prompts) == count:
            return prompts
    return [prompts[i % len(prompts)] for i in range(count)]


def sweep(base_url: str, model: str, label: str, levels: list[int], max_tokens: int, waves: int) -> list[LoadResult]:
    results = []
    asyncio.run(run_load(base_url, model, real_text_prompts(2), 2, 8, label))  # warm-up
    for concurrency in levels:
        prompts = real_text_prompts(max(4, concurrency * waves))
        result = asyncio.run(run_load(base_url, model, prompts, concurrency, max_tokens, label))
        print(f"  {label:12s} c={concurrency:3d}  {result.output_tokens_per_s:7.1f} tok/s  "
              f"TTFT p50 {result.ttft_p50:.2f}s", flush=True)
        results.append(result)
    return results


def print_table(results: list[LoadResult]) -> None:
    header = f"{'server':12s} {'conc':>4s} {'req/s':>7s} {'out tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} " \
             f"{'ITL p50':>8s} {'ITL p99':>8s} {'errors':>6s}"
    print(header)
    for r in results:
        print(f"{r.label:12s} {r.concurrency:4d} {r.requests_per_s:7.2f} {r.output_tokens_per_s:9.1f} "
              f"{r.ttft_p50:9.3f} {r.ttft_p99:9.3f} {r.itl_p50 * 1000:6.1f}ms {r.itl_p99 * 1000:6.1f}ms {r.errors:6d}")


def plot(results: list[LoadResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in sorted({r.label for r in results}):
        rows = [r for r in results if r.label == label]
        left.plot([r.concurrency for r in rows], [r.output_tokens_per_s for r in rows], "o-", label=label)
        right.plot([r.concurrency for r in rows], [r.ttft_p50 for r in rows], "o-", label=label)
    left.set(xlabel="concurrency", ylabel="output tokens/s", title="Throughput", xscale="log")
    right.set(xlabel="concurrency", ylabel="TTFT p50 (s)", title="Time to first token", xscale="log")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("SmolLM2-135M on a 2-core CPU, 128-token outputs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--waves", type=int, default=2, help="requests per level = waves x concurrency")
    parser.add_argument("--base-url", help="also measure this OpenAI-compatible server")
    parser.add_argument("--model", default=DEFAULT_MODEL_NAME, help="model name for --base-url")
    parser.add_argument("--no-fusedserve", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-engine-only", action="store_true", help="skip the engine-alone replay")
    parser.add_argument(
        "--baseline-concurrency", type=int, nargs="+", default=[1, 8],
        help="the baseline serves one request at a time, so higher levels only lengthen its queue",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads of both servers")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="extra `fusedserve serve` flags")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_bench.json")
    args = parser.parse_args()

    model_dir = ensure_default_model()
    logs = Path("runs") / "serve_bench"
    results: list[LoadResult] = []
    threads = ["--threads", str(args.threads)] if args.threads else []
    machine_before = measure_machine(args.threads)
    print(f"machine now: {machine_before.as_dict()} (brief: {BRIEF_REFERENCE})", flush=True)
    if not args.no_fusedserve:
        command = ["-m", "fusedserve.cli", "serve", "--max-model-len", "2048", *threads, *args.serve_args]
        with running_server(command, logs / "fusedserve.log") as url:
            results += sweep(url, DEFAULT_MODEL_NAME, "fusedserve", args.concurrency, args.max_tokens, args.waves)
        if not args.no_engine_only and not args.serve_args:  # extra serve flags have no engine-only twin
            for concurrency in args.concurrency:
                prompts = real_text_prompts(max(4, concurrency * args.waves))
                result = replay(model_dir, prompts, concurrency, args.max_tokens, args.threads)
                print(f"  {result.label:12s} c={concurrency:3d}  {result.output_tokens_per_s:7.1f} tok/s  "
                      f"TTFT p50 {result.ttft_p50:.2f}s", flush=True)
                results.append(result)
    if not args.no_baseline:
        command = [str(Path(__file__).with_name("hf_baseline_server.py")), "--model", str(model_dir), *threads]
        with running_server(command, logs / "hf_baseline.log") as url:
            results += sweep(url, "hf-baseline", "transformers", args.baseline_concurrency, args.max_tokens, 1)
    if args.base_url:
        results += sweep(args.base_url, args.model, "external", args.concurrency, args.max_tokens, args.waves)

    machine_after = measure_machine(args.threads)
    print_table(results)
    print(f"machine before: {machine_before.as_dict()}\nmachine after:  {machine_after.as_dict()}")
    summary = {}
    for r in results:
        key = r.label.replace("-", "_")
        summary[f"{key}_tok_s_c{r.concurrency}"] = round(r.output_tokens_per_s, 2)
        summary[f"{key}_ttft_p50_c{r.concurrency}"] = round(r.ttft_p50, 4)
    bf16_speeds = (machine_before.bf16_matmul_tflops, machine_after.bf16_matmul_tflops)
    summary["machine_bf16_tflops"] = round(sum(bf16_speeds) / 2, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "summary": summary,
        "settings": {"threads": args.threads,
                     "concurrency": args.concurrency, "max_tokens": args.max_tokens, "prompt_chars": PROMPT_CHARS,
                     "serve_args": args.serve_args},
        "machine": {"before": machine_before.as_dict(), "after": machine_after.as_dict(),
                    "brief_reference": BRIEF_REFERENCE},
        "results": [r.as_dict() for r in results],
    }, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
