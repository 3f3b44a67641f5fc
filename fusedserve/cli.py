"""The `fusedserve` console script: one subcommand per job, each defined next to the code it drives.

Every module listed in SUBCOMMAND_MODULES exposes `register(subparsers)`, which adds its parser and sets
`handler` (a function taking the parsed namespace and returning an exit code). Heavy imports (torch,
transformers) happen inside handlers, so `fusedserve --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "fusedserve.server.cli",
    "fusedserve.engine.gstack.cli",
    "fusedserve.engine.adaptivocab.cli",
    "fusedserve.engine.larosa.cli",
    "fusedserve.clients.chat",
    "fusedserve.presets",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
