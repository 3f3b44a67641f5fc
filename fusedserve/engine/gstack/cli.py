"""`fusedserve gstack grow|train|experiment`: command-line entry points of the Gstack subpackage.

Each handler parses nothing itself (argparse did), imports torch/transformers lazily, pins torch to the
requested thread count, calls one function of grow.py / train.py / experiment.py and returns an exit code.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "gstack", help="Gstack model growth: grow, (continued) pre-train, experiment"
    )
    commands = parser.add_subparsers(dest="gstack_command", required=True)

    grow = commands.add_parser("grow", help="stack a Llama folder's layers G times (G_stack operator)")
    grow.add_argument("--base", type=Path, required=True, help="trained Llama model folder")
    grow.add_argument("--factor", type=int, default=4, help="growth factor G (target has G x L layers)")
    grow.add_argument("--out", type=Path, required=True, help="folder to write the grown model to")
    grow.set_defaults(handler=handle_grow)

    train = commands.add_parser(
        "train", help="pre-train / continue pre-training on the byte-level stdlib corpus"
    )
    train.add_argument(
        "--model", type=Path, help="Llama folder to start from (omit: a fresh byte-level model)"
    )
    train.add_argument("--out", type=Path, required=True, help="output model folder (checkpoints live here)")
    budget = train.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="optimizer steps")
    budget.add_argument("--tokens", type=int, help="training tokens (rounded to whole steps)")
    train.add_argument("--layers", type=int, default=2, help="fresh model: layers")
    train.add_argument("--hidden", type=int, default=64, help="fresh model: hidden size")
    train.add_argument("--heads", type=int, default=4, help="fresh model: attention heads")
    train.add_argument("--intermediate", type=int, default=176, help="fresh model: MLP size")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--seq-len", type=int, default=128)
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    train.add_argument("--warmup", type=int, default=50, help="warmup steps")
    train.add_argument("--eval-every", type=int, default=50)
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--offset-tokens", type=int, default=0, help="skip the stream's first tokens")
    train.add_argument("--corpus-root", type=Path, help="folder of .py files (default: the CPython stdlib)")
    train.add_argument("--seed", type=int, default=0)
    _add_common(train)
    train.set_defaults(handler=handle_train)

    experiment = commands.add_parser(
        "experiment", help="Gstack vs scratch vs shallow at equal FLOPs (resumable)"
    )
    experiment.add_argument("--out", type=Path, default=Path("runs/gstack"), help="run folders (checkpoints)")
    experiment.add_argument("--results", type=Path, default=Path("docs/results/gstack.json"))
    experiment.add_argument("--budget-flops", type=float, default=4.4e13, help="FLOPs per compared run")
    experiment.add_argument("--base-layers", type=int, default=2)
    experiment.add_argument("--factor", type=int, default=4)
    experiment.add_argument("--hidden", type=int, default=64)
    experiment.add_argument("--base-fraction", type=float, default=0.1, help="share of FLOPs for the base")
    experiment.add_argument(
        "--long-factor", type=float, default=0.0, help="also train scratch on this x the budget (0: skip)"
    )
    experiment.add_argument("--report-only", action="store_true", help="rewrite JSON/plots, train nothing")
    _add_common(experiment)
    experiment.set_defaults(handler=handle_experiment)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-minutes", type=float, help="stop (checkpointed) after this long; re-run resumes"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def handle_grow(args: argparse.Namespace) -> int:
    from fusedserve.engine.gstack.grow import grow_folder

    _set_threads(1)
    result = grow_folder(args.base, args.factor, args.out)
    print(f"grew {result.base_layers} -> {result.target_layers} layers into {result.out}")
    return 0


def handle_train(args: argparse.Namespace) -> int:
    from fusedserve.engine.gstack.corpus import TokenStream, heldout_windows, load_corpus
    from fusedserve.engine.gstack.model_folder import ModelShape, create_random_model
    from fusedserve.engine.gstack.train import TrainConfig, train

    _set_threads(args.threads)
    init = args.model
    if init is None:
        init = args.out / "init_model"
        if not (init / "config.json").exists():
            shape = ModelShape(args.layers, args.hidden, args.heads, args.intermediate, 4 * args.seq_len)
            create_random_model(init, shape, args.seed)
    steps = args.steps if args.steps is not None else max(1, args.tokens // (args.batch_size * args.seq_len))
    config = TrainConfig(
        total_steps=steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_lr=args.lr,
        warmup_steps=min(args.warmup, steps),
        eval_every=args.eval_every,
        log_every=min(10, args.eval_every),
        checkpoint_every=args.checkpoint_every,
        offset_tokens=args.offset_tokens,
    )
    corpus = load_corpus(args.corpus_root)
    stream = TokenStream(corpus.train, args.seq_len, seed=args.seed)
    heldout = heldout_windows(corpus.heldout, args.seq_len, 128)
    max_seconds = None if args.max_minutes is None else 60.0 * args.max_minutes
    outcome = train(init, args.out, config, stream, heldout, max_seconds, not args.no_progress)
    state = "finished" if outcome.finished else "paused (re-run the same command to resume)"
    print(f"{state}: step {outcome.step}/{steps}, {outcome.tokens} tokens, {outcome.flops:.3g} FLOPs")
    return 0


def handle_experiment(args: argparse.Namespace) -> int:
    from fusedserve.engine.gstack.experiment import Experiment, ExperimentConfig

    _set_threads(args.threads)
    config = ExperimentConfig(
        out=args.out,
        results_json=args.results,
        base_layers=args.base_layers,
        factor=args.factor,
        hidden_size=args.hidden,
        budget_flops=args.budget_flops,
        base_fraction=args.base_fraction,
        long_factor=args.long_factor,
    )
    experiment = Experiment(config)
    if args.report_only:
        result = experiment.write_results()
    else:
        experiment.run(args.max_minutes, progress=not args.no_progress)
        result = experiment.write_results()
    print(f"results: {args.results} (complete: {result['complete']})")
    if "summary" in result:
        for key, value in result["summary"].items():
            print(f"  {key}: {value}")
    return 0
