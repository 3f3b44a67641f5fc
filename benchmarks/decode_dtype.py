"""Which compute dtype a decode step should use on this CPU, by batch size: fp32 vs bf16 (AMX), whole model.

SmolLM2-135M decode steps (model forward + LM head, one new token per sequence, --context tokens of KV each) with
every linear in fp32 (`DenseLinear(bf16_min_rows=None)`: fp32 blocks and KV) and in bf16 from the first row (a bf16
weight copy, bf16 blocks and KV, fp32 residual stream and logits). The two are interleaved round by round and each
ratio is the median of per-round ratios. kernels/linear.BF16_MIN_ROWS is the smallest batch from which bf16 wins
at every thread count. Writes docs/results/decode_dtype.json (with a "summary") and prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from larosa import DecodeBench

from fusedserve.engine.model.default_model import ensure_default_model
from fusedserve.engine.model.loader import load_llama
from fusedserve.kernels.linear import DenseLinear

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="decode steps per round and model copy")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_dtype.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    model_dir = ensure_default_model()

    def load(bf16_min_rows: int | None) -> DecodeBench:
        model = load_llama(
            model_dir,
            max_positions=args.context + 1,
            make_linear=lambda name, weight, bias: DenseLinear(weight, bias, bf16_min_rows=bf16_min_rows),
        )
        return DecodeBench(model, [max(batches)], args.context)

    # Each dtype loaded twice, in palindromic order (fp32, bf16, bf16, fp32), each step time the mean over both
    # copies: a model loaded earlier in a process ran up to 10% slower here (see benchmarks/larosa.py's speed()).
    min_rows = {"fp32": None, "bf16": 1}
    benches = [(name, load(min_rows[name])) for name in ("fp32", "bf16", "bf16", "fp32")]
    results: dict[str, dict] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in batches:
            for _, bench in benches:
                bench.step_seconds(batch, 1)  # warm-up
            seconds: dict[str, list[float]] = {name: [0.0] * args.rounds for name in min_rows}
            for r in range(args.rounds):
                for name, bench in benches:
                    seconds[name][r] += bench.step_seconds(batch, args.steps) / 2
            pairs = zip(seconds["fp32"], seconds["bf16"], strict=True)
            row = {f"{name}_tok_s": batch / statistics.median(t) for name, t in seconds.items()}
            row["bf16_speedup"] = statistics.median(f / b for f, b in pairs)
            results[f"t{threads}_b{batch}"] = row
            print(
                f"threads={threads} batch={batch:2d}: fp32 {row['fp32_tok_s']:7.1f} tok/s  "
                f"bf16 {row['bf16_tok_s']:7.1f} tok/s  bf16/fp32 x{row['bf16_speedup']:.2f}",
                flush=True,
            )
    summary = {f"bf16_speedup_{key}": round(row["bf16_speedup"], 3) for key, row in results.items()}
    wins = [b for b in batches if all(r["bf16_speedup"] >= 1.0 for k, r in results.items() if k.endswith(f"_b{b}"))]
    losing = [b for b in batches if b not in wins]
    summary["bf16_wins_from_batch"] = (max(losing) + 1) if losing else min(batches)
    report = {"summary": summary, "setup": vars(args) | {"out": str(args.out), "model": str(model_dir)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report | {"results": results}, indent=2))
    print(f"bf16 wins from batch {summary['bf16_wins_from_batch']}; wrote {args.out}")


if __name__ == "__main__":
    main()
