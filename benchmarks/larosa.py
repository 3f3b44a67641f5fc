"""LaRoSA on SmolLM2-135M: perplexity and decode speed, LaRoSA vs unrotated top-k (TEAL-style) vs dense.

1. Quality: perplexity on held-out Python-documentation text (never seen by calibration) at sparsity 0/25/40/50%
   for LaRoSA (rotated folder) with the greedy per-layer allocation ("larosa", re-planned per sparsity from the
   folder's sensitivity table) and with the fixed-ratio allocation ("larosa_fixed_ratio"), and for plain magnitude
   top-k on the original model with fixed-ratio coefficients ("topk"), and for the paper's calibration recipe
   (Q_l from the attention input alone, no V/O rotations) with the greedy allocation ("larosa_paper", its own
   folder). Exact fp32 dense layers, so the numbers measure the method, not bf16 rounding.
2. Speed: decode tokens/s of the model forward + LM head with a single-position KV write per sequence (context
   fixed at --context tokens), at batch 1, 2, 4, 8 and 16, dense vs LaRoSA 40% and 50%, with the engine's default
   mixed-precision dense layers. Configurations are interleaved round by round and each ratio is the median of
   per-round ratios, so load from other processes on the shared cores hits all of them alike; each is loaded twice,
   in palindromic order, against a bias by load order and by place in the round (see speed()). Batch 1/2/4/8/16 at 1
   torch thread (the summary), batch 1/2/4 at 2 threads. LaRoSA runs with the allocation given by --speed-allocation.
3. The union of kept channels per batch (LaRoSA vs unrotated), which decides the per-step sparse/dense choice.
Writes docs/results/larosa.json (with a "summary" object) and a PNG; prints tables. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fusedserve.engine.larosa.calibrate import CalibrationConfig, build_larosa_model
from fusedserve.engine.larosa.corpus import PYTHON_DOCS, corpus_windows
from fusedserve.engine.larosa.dense_twin import attach_dense_twin
from fusedserve.engine.larosa.runtime import layer_index, module_kind, plan_for, sparse_linear_factory
from fusedserve.engine.larosa.sparsity import FIXED_RATIO, GREEDY
from fusedserve.engine.model.default_model import cache_root, ensure_default_model
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import LinearFactory, dense_linear_factory, load_llama
from fusedserve.engine.tokenizer import load_tokenizer
from fusedserve.kernels.attention import SlotBatch
from fusedserve.kernels.linear import amx_available
from fusedserve.kernels.sparse_linear import TopKSparseLinear, topk_mask

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


# quality method -> (which folder, which allocation)
METHODS = {
    "larosa": ("larosa", GREEDY),
    "larosa_fixed_ratio": ("larosa", FIXED_RATIO),
    "larosa_paper": ("paper", GREEDY),
    "topk": ("dense", FIXED_RATIO),
}
# the paper's recipe: one PCA of the attention input per layer, o_proj's input unrotated
PAPER_RECIPE = {"mlp_covariance_weight": 0.0, "rotate_values": False}


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def factory_for(
    model_dir: Path, sparsity: float, dense: LinearFactory, mask_all: bool = False, allocation: str = GREEDY
) -> LinearFactory:
    """mask_all: top-k on every token, also on the dense path (quality); off: as served (speed)."""
    if sparsity == 0.0:
        return dense
    return sparse_linear_factory(plan_for(model_dir, sparsity, allocation), dense, mask_dense_path=mask_all)


def caches(model: LlamaModel, slots: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V caches in the model's KV dtype (bf16 for the served mixed-precision model, as the engine
    allocates them; fp32 for the exact quality runs)."""
    arch = model.arch
    shape = (slots, length, arch.num_kv_heads, arch.head_dim)
    return tuple([torch.zeros(shape, dtype=model.kv_dtype) for _ in model.layers] for _ in range(2))


@torch.inference_mode()
def perplexity(model: LlamaModel, windows: list[torch.Tensor]) -> float:
    total_nll, total_tokens = 0.0, 0
    for ids in windows:
        n = ids.shape[0]
        keys, values = caches(model, 1, n)
        hidden = model.forward(ids, SlotBatch.build([0], [n], [n]), keys, values)
        logits = model.compute_logits(hidden[:-1])
        total_nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        total_tokens += n - 1
    return math.exp(total_nll / total_tokens)


def quality(
    dense_dir: Path, larosa_dir: Path, paper_dir: Path, windows: list[torch.Tensor], sparsities: list[float]
) -> dict:
    results: dict[str, dict[str, float]] = {method: {} for method in METHODS}
    folders = {"larosa": larosa_dir, "dense": dense_dir, "paper": paper_dir}
    for method, (folder, allocation) in METHODS.items():
        model_dir = folders[folder]
        for s in sparsities:
            if method != "larosa" and s == 0.0:
                continue
            started = time.perf_counter()
            factory = factory_for(model_dir, s, dense_linear_factory, True, allocation)
            model = load_llama(model_dir, make_linear=factory)
            results[method][f"{s:.2f}"] = ppl = perplexity(model, windows)
            print(f"  ppl {method:18s} s={s:.2f}: {ppl:8.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
            del model
    results["dense"] = results["larosa"]["0.00"]  # rotated dense == original dense (tested to 1e-3)
    return results


class DecodeBench:
    """One model prepared for decode steps of a given batch size: KV caches filled, fixed positions."""

    def __init__(self, model: LlamaModel, batch_sizes: list[int], context: int) -> None:
        self.model = model
        self.keys, self.values = caches(model, max(batch_sizes), context + 1)
        gen = torch.Generator().manual_seed(0)
        for slot in range(max(batch_sizes)):  # a real prompt per slot so attention reads real K/V
            ids = torch.randint(0, model.arch.vocab_size, (context,), generator=gen)
            model.forward(ids, SlotBatch.build([slot], [context], [context]), self.keys, self.values)
        self.context = context

    def step_seconds(self, batch_size: int, steps: int) -> float:
        batch = SlotBatch.build(list(range(batch_size)), [1] * batch_size, [self.context + 1] * batch_size)
        ids = torch.arange(batch_size) + 100
        started = time.perf_counter()
        for _ in range(steps):
            self.model.compute_logits(self.model.forward(ids, batch, self.keys, self.values))
        return (time.perf_counter() - started) / steps


def sparse_fraction(model: LlamaModel) -> float:
    layers = [m for layer in model.layers for m in vars(layer).values() if isinstance(m, TopKSparseLinear)]
    sparse = sum(layer.stats.sparse_calls for layer in layers)
    total = sparse + sum(layer.stats.dense_calls for layer in layers)
    for layer in layers:
        layer.stats.sparse_calls = layer.stats.dense_calls = 0
    return sparse / total if total else 0.0


def speed(dense_dir: Path, larosa_dir: Path, plan: list[tuple[int, list[int]]], args) -> dict:
    """Decode throughput per (threads, batch sizes) entry of `plan`, all configurations interleaved."""
    from fusedserve.engine.model.loader import mixed_precision_linear_factory as mixed

    configs = {"dense": (dense_dir, 0.0), "larosa_40": (larosa_dir, 0.4), "larosa_50": (larosa_dir, 0.5)}
    largest = max(b for _, sizes in plan for b in sizes)

    def load(d: Path, s: float) -> LlamaModel:
        """As served (llm_engine.load_model_for_engine): sparse layers plus the dense twin for large steps."""
        factory = factory_for(d, s, mixed, allocation=args.speed_allocation)
        model = load_llama(d, max_positions=args.context + 1, make_linear=factory)
        attach_dense_twin(model, mixed)
        return model

    # Every configuration is loaded twice, in palindromic order (dense, 40, 50, 50, 40, dense), and each round
    # runs them in that order, a step time being the sum over both copies. A model's speed here depended on when it
    # was loaded (later copies of one folder ran up to 10% faster, in any order) and on its place in the round; with
    # dense loaded first, LaRoSA's published ratios carried that bias (batch 4 on the dense twin read 1.05-1.12x).
    order = list(configs) + list(reversed(configs))
    benches = [(name, DecodeBench(load(*configs[name]), [largest], args.context)) for name in order]
    results: dict[str, dict] = {}
    for thread_count, batch_sizes in plan:
        torch.set_num_threads(thread_count)
        for b in batch_sizes:
            for _, bench in benches:
                bench.step_seconds(b, 2)  # warm-up
                sparse_fraction(bench.model)
            rounds: dict[str, list[float]] = {name: [0.0] * args.rounds for name in configs}
            for r in range(args.rounds):
                for name, bench in benches:
                    rounds[name][r] += bench.step_seconds(b, args.steps) / 2
            row = {"tok_s": {n: b / statistics.median(t) for n, t in rounds.items()}}
            for name in ("larosa_40", "larosa_50"):
                pairs = zip(rounds["dense"], rounds[name], strict=True)
                row[f"speedup_{name}"] = statistics.median(d / s for d, s in pairs)
                copies = [bench.model for n, bench in benches if n == name]
                row[f"sparse_call_fraction_{name}"] = statistics.mean(sparse_fraction(m) for m in copies)
            results[f"t{thread_count}_b{b}"] = row
            print(
                f"  threads={thread_count} batch={b:2d}: "
                + "  ".join(f"{n} {v:7.1f} tok/s" for n, v in row["tok_s"].items())
                + f"  x40 {row['speedup_larosa_40']:.2f}  x50 {row['speedup_larosa_50']:.2f}"
                + f"  sparse-path {row['sparse_call_fraction_larosa_50']:.0%}",
                flush=True,
            )
    return results


@torch.inference_mode()
def union_fractions(dense_dir: Path, larosa_dir: Path, windows: list[torch.Tensor], sparsity: float) -> dict:
    """Mean union of kept channels over groups of B consecutive prompt tokens (proxy for a decode batch)."""
    out: dict[str, dict[str, float]] = {}
    for method, model_dir in (("larosa", larosa_dir), ("topk", dense_dir)):
        seen: dict[int, list[float]] = {1: [], 4: [], 16: []}
        plan = plan_for(model_dir, sparsity, METHODS[method][1])

        def recording(name: str, weight: torch.Tensor, bias: torch.Tensor | None, plan=plan, seen=seen):
            inner = dense_linear_factory(name, weight, bias)
            k = plan.kept(module_kind(name), weight.shape[1], layer_index(name))
            if k is None:
                return inner

            def call(x: torch.Tensor):
                kept = topk_mask(x, k) != 0
                for b in seen:
                    groups = kept[: (x.shape[0] // b) * b].view(-1, b, x.shape[1]).any(1)
                    seen[b].append(groups.float().mean().item())
                return inner(topk_mask(x, k))

            call.in_features, call.out_features = weight.shape[1], weight.shape[0]
            return call

        model = load_llama(model_dir, make_linear=recording)
        perplexity(model, windows[:1])
        out[method] = {f"b{b}": statistics.mean(v) for b, v in seen.items()}
        print(
            f"  union of kept channels, {method}, s={sparsity}: "
            + "  ".join(f"{k} {v:.0%}" for k, v in out[method].items()),
            flush=True,
        )
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    q = results["quality"]
    labels = {
        "larosa": "LaRoSA, greedy per-layer allocation",
        "larosa_fixed_ratio": "LaRoSA, fixed ratio 0.8:1.2",
        "larosa_paper": "LaRoSA, paper's Q (attention input only), greedy",
        "topk": "top-k, unrotated (TEAL-style)",
    }
    for method, label in labels.items():
        if method not in q:
            continue
        points = sorted((float(s), p) for s, p in q[method].items())
        if method != "larosa":
            points = [(0.0, q["dense"])] + points
        left.plot([100 * s for s, _ in points], [p for _, p in points], marker="o", label=label)
    left.axhline(q["dense"] * 1.05, color="grey", linestyle=":", label="dense +5%")
    left.set(xlabel="sparsity (%)", ylabel="perplexity (held-out Python docs)", title="Quality")
    left.legend()
    speeds = results["speed"]
    labels = list(speeds)
    x = range(len(labels))
    for offset, name in ((-0.2, "larosa_40"), (0.2, "larosa_50")):
        right.bar(
            [i + offset for i in x],
            [speeds[k][f"speedup_{name}"] for k in labels],
            width=0.4,
            label=name.replace("_", " ") + "%",
        )
    right.axhline(1.0, color="black", linewidth=0.8)
    right.set_xticks(list(x), [k.replace("_", "\n") for k in labels])
    title = f"Decode speed-up (threads, batch; {results.get('speed_allocation', FIXED_RATIO)} levels)"
    right.set(ylabel="decode tokens/s vs dense", title=title)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="dense model folder (default: SmolLM2-135M)")
    parser.add_argument("--larosa", type=Path, default=None, help="LaRoSA folder (calibrated here if missing)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5")
    parser.add_argument("--batches", default="1,2,4,8,16", help="batch sizes at 1 thread")
    parser.add_argument("--batches-2t", default="1,2,4", help="batch sizes at 2 threads ('' to skip)")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per round and model copy")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--ppl-threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "larosa.json")
    parser.add_argument("--reuse-quality", action="store_true", help="keep quality/unions from --out; time only")
    parser.add_argument("--reuse-speed", action="store_true", help="keep the speed results from --out; quality only")
    parser.add_argument("--speed-allocation", choices=[GREEDY, FIXED_RATIO], default=GREEDY)
    args = parser.parse_args()
    if args.reuse_quality and args.reuse_speed:
        parser.error("--reuse-quality and --reuse-speed together measure nothing")
    if not args.reuse_speed and not {1, 4, 16} <= {int(b) for b in args.batches.split(",")}:
        parser.error("--batches must include 1, 4 and 16: the summary reports them")

    dense_dir = args.model or ensure_default_model()
    larosa_dir = args.larosa or cache_root() / "models" / f"{dense_dir.name}-larosa"
    tokenizer = load_tokenizer(dense_dir)
    paper_dir = larosa_dir.with_name(larosa_dir.name + "-paper")
    # The speed runs need the LaRoSA folder even when the quality results are reused; the paper-recipe folder only
    # serves the quality runs.
    needed = [(larosa_dir, {})] + ([] if args.reuse_quality else [(paper_dir, PAPER_RECIPE)])
    for folder, recipe in needed:
        if not (folder / "model.safetensors").exists():
            print(f"calibrating {folder} ...", flush=True)
            calibration = corpus_windows(None, tokenizer, "train", 1024, 32768)
            config = CalibrationConfig(sparsity=0.4, **recipe)
            build_larosa_model(dense_dir, folder, config, calibration, PYTHON_DOCS)
    if args.reuse_quality:
        previous = json.loads(args.out.read_text())
        q, unions = previous["quality"], previous["union_of_kept_channels_s50"]
        args.eval_tokens = previous["setup"]["eval_tokens"]
    else:
        heldout = corpus_windows(None, tokenizer, "heldout", args.seq_len, args.eval_tokens)
        torch.set_num_threads(args.ppl_threads)
        print(f"perplexity on {sum(w.numel() for w in heldout)} held-out tokens", flush=True)
        sparsities = [float(s) for s in args.sparsities.split(",")]
        q = quality(dense_dir, larosa_dir, paper_dir, heldout, sparsities)
        unions = union_fractions(dense_dir, larosa_dir, heldout, 0.5)
    if args.reuse_speed:
        previous = json.loads(args.out.read_text())
        s, speed_allocation = previous["speed"], previous.get("speed_allocation", FIXED_RATIO)
        args.context, args.steps, args.rounds = (previous["setup"][k] for k in ("context", "steps", "rounds"))
    else:
        print("decode speed (median of interleaved rounds)", flush=True)
        plan = [(1, [int(b) for b in args.batches.split(",")])]
        if args.batches_2t:
            plan.append((2, [int(b) for b in args.batches_2t.split(",")]))
        s, speed_allocation = speed(dense_dir, larosa_dir, plan, args), args.speed_allocation
    first = "t1"
    summary = {
        "ppl_dense": q["dense"],
        "ppl_larosa_40": q["larosa"]["0.40"],
        "ppl_larosa_50": q["larosa"]["0.50"],
        "ppl_topk_40": q["topk"]["0.40"],
        "ppl_topk_50": q["topk"]["0.50"],
        "ppl_larosa_25": q["larosa"].get("0.25"),
        "ppl_topk_25": q["topk"].get("0.25"),
        **{f"ppl_larosa_fixed_ratio_{level[2:4]}": p for level, p in q.get("larosa_fixed_ratio", {}).items()},
        **{f"ppl_larosa_paper_{level[2:4]}": p for level, p in q.get("larosa_paper", {}).items()},
        "speedup_b1_40": s[f"{first}_b1"]["speedup_larosa_40"],
        "speedup_b1_50": s[f"{first}_b1"]["speedup_larosa_50"],
        "speedup_b4_50": s[f"{first}_b4"]["speedup_larosa_50"],
        "speedup_b16_50": s[f"{first}_b16"]["speedup_larosa_50"],
        **({"speedup_b8_50": s[f"{first}_b8"]["speedup_larosa_50"]} if f"{first}_b8" in s else {}),
        # "never slower than dense at any batch size": the worst ratio measured, any sparsity, any thread count
        "min_speedup": min(row[f"speedup_{n}"] for row in s.values() for n in ("larosa_40", "larosa_50")),
    }
    results = {
        "summary": summary,
        "summary_threads": 1,
        "allocation": {method: allocation for method, (_, allocation) in METHODS.items()},
        "speed_allocation": speed_allocation,
        "quality": q,
        "union_of_kept_channels_s50": unions,
        "speed": s,
        "setup": {
            "model": str(dense_dir),
            "larosa": str(larosa_dir),
            "larosa_paper": str(paper_dir),
            "eval_tokens": args.eval_tokens,
            "seq_len": args.seq_len,
            "context": args.context,
            "steps": args.steps,
            "rounds": args.rounds,
            "corpus": "python3.11-doc held-out split",
            "torch": torch.__version__,
            "cpu": cpu_model(),
            "amx": amx_available(),  # hosts differ between sessions; bf16 products of 5+ rows depend on it
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print("\n".join(f"{k:16s} {v:8.3f}" for k, v in summary.items()))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
