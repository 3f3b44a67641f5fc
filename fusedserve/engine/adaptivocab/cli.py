"""`fusedserve adaptivocab build|finetune`: the offline half of AdaptiVocab on the command line.

Only argument parsing lives here; torch and transformers are imported inside the handlers so
`fusedserve --help` stays fast. Each handler returns an exit code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("adaptivocab", help="adapt a model's vocabulary to a domain (AdaptiVocab)")
    commands = parser.add_subparsers(dest="adaptivocab_command", required=True)

    build = commands.add_parser("build", help="choose domain n-grams, patch the tokenizer, init embeddings")
    build.add_argument(
        "--model", default=None, help="source HF model folder (default: SmolLM2-135M-Instruct)"
    )
    build.add_argument(
        "--corpus", default=None, help="directory of text files (default: python3.11-doc's .rst sources)"
    )
    build.add_argument("--out", required=True, type=Path, help="adapted model folder to write")
    build.add_argument("--replace", type=int, default=10_000, help="how many original tokens to replace")
    build.add_argument("--max-n", type=int, default=3, help="longest n-gram, in original tokens")
    build.add_argument("--min-count", type=int, default=2, help="ignore n-grams seen fewer times")
    build.add_argument("--heldout-fraction", type=float, default=0.1, help="share of files held out")
    build.set_defaults(handler=run_build_command)

    tune = commands.add_parser("finetune", help="train embeddings, LM head, first and last layers")
    tune.add_argument("--model", required=True, type=Path, help="folder written by `adaptivocab build`")
    tune.add_argument("--corpus", default=None, help="directory of text files (default: the build's corpus)")
    tune.add_argument("--out", required=True, type=Path, help="fine-tuned model folder to write")
    tune.add_argument("--steps", type=int, default=1500, help="optimizer steps in total (resume extends)")
    tune.add_argument("--max-new-steps", type=int, default=None, help="stop (checkpointed) after N steps now")
    tune.add_argument("--seq-len", type=int, default=512)
    tune.add_argument("--grad-accum", type=int, default=4, help="sequences per optimizer step")
    tune.add_argument("--lr", type=float, default=5e-4)
    tune.add_argument("--warmup", type=int, default=40, help="linear warmup steps before the cosine decay")
    tune.add_argument("--weight-decay", type=float, default=0.1)
    tune.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of --lr")
    tune.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="default: runs/adaptivocab/<out>-ckpt"
    )
    tune.add_argument("--checkpoint-every", type=int, default=10)
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--no-bf16", action="store_true", help="train in float32 instead of bf16 autocast")
    tune.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    tune.set_defaults(handler=run_finetune_command)


def run_build_command(args: argparse.Namespace) -> int:
    from fusedserve.engine.adaptivocab.build import BuildRequest, run_build
    from fusedserve.engine.model.default_model import ensure_default_model

    model = Path(args.model) if args.model else ensure_default_model()
    request = BuildRequest(
        model_dir=model,
        corpus=args.corpus,
        out=args.out,
        replace=args.replace,
        max_n=args.max_n,
        min_count=args.min_count,
        heldout_fraction=args.heldout_fraction,
    )
    entry = run_build(request)
    print(json.dumps(entry, indent=2, ensure_ascii=False))
    print(f"wrote {args.out}")
    return 0


def run_finetune_command(args: argparse.Namespace) -> int:
    import torch

    from fusedserve.engine.adaptivocab.finetune import FinetuneConfig, FinetuneRequest, run_finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig(
        steps=args.steps,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        min_lr_ratio=args.min_lr_ratio,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        bf16=not args.no_bf16,
    )
    out = Path(args.out)
    checkpoint_dir = args.checkpoint_dir or Path("runs") / "adaptivocab" / f"{out.name}-ckpt"
    request = FinetuneRequest(args.model, args.corpus, out, checkpoint_dir, config, args.max_new_steps)
    record = run_finetune(request)
    print(json.dumps(record, indent=2))
    if record["steps_done"] < config.steps:
        print(f"paused at step {record['steps_done']}/{config.steps}; rerun the same command to resume")
    else:
        print(f"wrote {out}")
    return 0
