"""`fusedserve gstack train|grow` end to end on a tiny model: pre-training, growth, continued training."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fusedserve.engine.gstack import cli
from fusedserve.engine.gstack.manifest import read_manifest

torch.set_num_threads(1)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fusedserve")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gstack", *argv])
    return args.handler(args)


def test_train_then_grow_then_continue_training(tmp_path: Path) -> None:
    tiny = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--warmup", "1", "--no-progress"]
    shape = ["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "64"]
    assert run_cli("train", "--out", str(tmp_path / "base"), "--steps", "2", *shape, *tiny) == 0
    grow_args = ["--base", str(tmp_path / "base"), "--factor", "4", "--out", str(tmp_path / "grown")]
    assert run_cli("grow", *grow_args) == 0
    grown_args = ["--model", str(tmp_path / "grown"), "--out", str(tmp_path / "trained"), "--tokens", "192"]
    assert run_cli("train", *grown_args, "--offset-tokens", "128", *tiny) == 0
    assert read_manifest(tmp_path / "trained")["gstack"] == {
        "base": str(tmp_path / "base"),
        "factor": 4,
        "base_layers": 1,
        "base_tokens": 2 * 2 * 32,
        "trained_tokens": 3 * 2 * 32,
    }
