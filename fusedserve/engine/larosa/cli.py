"""`fusedserve larosa calibrate`: build a LaRoSA model folder from a dense Llama folder.

Parses flags into a CalibrationConfig and hands over to calibrate.py; torch and transformers are imported inside
the handler so `fusedserve --help` stays fast.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("larosa", help="LaRoSA: rotated top-k sparse activations")
    commands = parser.add_subparsers(dest="larosa_command", required=True)
    calibrate = commands.add_parser(
        "calibrate", help="calibrate rotations on real text and write a rotated, sparsity-annotated model folder"
    )
    calibrate.add_argument("--model", required=True, help="dense Llama-family model folder (Hugging Face layout)")
    calibrate.add_argument("--out", required=True, help="output model folder (replaced if it exists)")
    calibrate.add_argument("--sparsity", type=float, required=True, help="target sparsity, e.g. 0.4")
    calibrate.add_argument(
        "--corpus", default=None, help="directory of text files (default: the Python documentation, python-docs)"
    )
    calibrate.add_argument("--tokens", type=int, default=32768, help="calibration tokens (default 32768)")
    calibrate.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration window")
    calibrate.add_argument("--damping", type=float, default=0.01, help="diagonal damping, times mean(diag H)")
    calibrate.add_argument(
        "--allocation",
        choices=["greedy", "fixed-ratio"],
        default="greedy",
        help="greedy (default): per-layer, per-module levels from errors measured on the rotated model; "
        "fixed-ratio: one level per module kind, 0.8:1.2 for residual-stream vs o/down inputs",
    )
    calibrate.add_argument(
        "--sensitivity-tokens", type=int, default=1024, help="calibration tokens the greedy allocation measures on"
    )
    calibrate.add_argument(
        "--mlp-covariance-weight",
        type=float,
        default=0.5,
        help="weight of the MLP input's covariance next to the attention input's in each layer's rotation "
        "(default 0.5; 0: the paper's recipe, attention input only)",
    )
    calibrate.add_argument(
        "--no-value-rotation",
        action="store_true",
        help="leave V / o_proj unrotated (default: per-KV-head PCA of the attention outputs, absorbed into them)",
    )
    calibrate.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    calibrate.set_defaults(handler=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from fusedserve.engine.larosa.calibrate import CalibrationConfig, build_larosa_model
    from fusedserve.engine.larosa.corpus import PYTHON_DOCS, corpus_windows
    from fusedserve.engine.tokenizer import load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    config = CalibrationConfig(
        sparsity=args.sparsity,
        corpus=args.corpus,
        num_tokens=args.tokens,
        seq_len=args.seq_len,
        damping=args.damping,
        allocation=args.allocation,
        sensitivity_tokens=args.sensitivity_tokens,
        mlp_covariance_weight=args.mlp_covariance_weight,
        rotate_values=not args.no_value_rotation,
    )
    tokenizer = load_tokenizer(args.model)  # AdaptiVocab folders tokenize with their PatchTokenizer
    windows = corpus_windows(args.corpus, tokenizer, "train", args.seq_len, args.tokens)
    out = build_larosa_model(Path(args.model), Path(args.out), config, windows, args.corpus or PYTHON_DOCS)
    tokens = sum(w.numel() for w in windows)
    print(f"wrote {out} ({tokens} calibration tokens, sparsity {args.sparsity}, {args.allocation} allocation)")
    return 0
