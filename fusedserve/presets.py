"""Variant presets: which prepared model folder and which KV backend each technique combination serves.

`fusedserve serve --preset NAME` picks the model folder and KV backend from here (explicit --model/--kv-backend
still win). `fusedserve prepare` builds the prepared folders from the embedded default model, each step resumable
and skipped when its output already exists:

    adaptivocab build -> adaptivocab finetune  (the "adaptivocab" model)
    larosa calibrate on the default model      (the "larosa" model)
    larosa calibrate on the adapted model      (the "fused" model: AdaptiVocab + LaRoSA, served on vAttention)

Gstack is a training-time technique: its grown checkpoints are plain Llama folders served with --model; at this
machine's scale it cannot re-grow SmolLM2, so no preset applies it to the default model.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from fusedserve.engine.model.default_model import DEFAULT_MODEL_NAME, cache_root


@dataclass(frozen=True)
class Preset:
    name: str
    model: str  # "default" or the name of a prepared folder (see prepared_model_dir)
    kv_backend: str
    techniques: tuple[str, ...]


PRESETS = {
    p.name: p
    for p in [
        Preset("baseline", "default", "static", ()),
        Preset("vattention", "default", "vattention", ("vattention",)),
        Preset("adaptivocab", "adaptivocab", "static", ("adaptivocab",)),
        Preset("larosa", "larosa", "static", ("larosa",)),
        Preset("fused", "fused", "vattention", ("vattention", "adaptivocab", "larosa")),
    ]
}
DEFAULT_SPARSITY = 0.4  # LaRoSA's quality target (perplexity within +5%) is set at 40%
# The fused model's level: the fused preset must stay within 5% of the baseline's bits per byte, and AdaptiVocab
# alone already spends 4.2 of those 5 points; on the adapted model LaRoSA costs +0.1% / +0.6% / +3.3% bits per
# byte at 15 / 25 / 40% (benchmarks/fused.py's held-out sample, every token sparsified), so 25% is the most
# that fits.
FUSED_SPARSITY = 0.25


def prepared_model_dir(name: str) -> Path:
    return cache_root() / "models" / f"{DEFAULT_MODEL_NAME}-{name}"


def preset_model_dir(preset: Preset) -> Path | None:
    """The folder a preset serves (None: the default model). Raises if it has not been prepared."""
    if preset.model == "default":
        return None
    folder = prepared_model_dir(preset.model)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"preset {preset.name!r} needs {folder}: run `fusedserve prepare` first")
    return folder


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="build the prepared model folders the presets serve")
    parser.add_argument("--only", choices=["adaptivocab", "larosa", "fused"], nargs="+", default=None)
    parser.add_argument("--finetune-steps", type=int, default=None, help="AdaptiVocab fine-tuning steps")
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY, help="the larosa model's sparsity")
    parser.add_argument("--fused-sparsity", type=float, default=FUSED_SPARSITY, help="the fused model's sparsity")
    parser.add_argument("--threads", type=int, default=None)
    parser.set_defaults(handler=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from fusedserve.cli import main as cli
    from fusedserve.engine.model.default_model import ensure_default_model

    wanted = set(args.only or ["adaptivocab", "larosa", "fused"])
    threads = ["--threads", str(args.threads)] if args.threads else []
    default = str(ensure_default_model())
    vocab = prepared_model_dir("adaptivocab-init")
    adapted = prepared_model_dir("adaptivocab")
    if wanted & {"adaptivocab", "fused"}:
        if not (vocab / "config.json").exists():
            _step("adaptivocab build", cli(["adaptivocab", "build", "--model", default, "--out", str(vocab)]))
        steps = ["--steps", str(args.finetune_steps)] if args.finetune_steps else []
        if not (adapted / "config.json").exists() or args.finetune_steps:
            _step("adaptivocab finetune", cli(["adaptivocab", "finetune", "--model", str(vocab), "--out",
                                                 str(adapted), *steps, *threads]))
    for name, source, sparsity in (("larosa", default, args.sparsity), ("fused", str(adapted), args.fused_sparsity)):
        out = prepared_model_dir(name)
        if name in wanted and not (out / "config.json").exists():
            _step(f"larosa calibrate ({name})", cli(["larosa", "calibrate", "--model", source, "--out", str(out),
                                                     "--sparsity", str(sparsity), *threads]))
    for name in sorted(wanted):
        print(f"{name}: {prepared_model_dir(name)}")
    return 0


def _step(title: str, code: int) -> None:
    if code != 0:
        raise SystemExit(f"`{title}` failed with exit code {code}")
