"""The `subjective` command line: one sub-command group per module, imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)`, adding its own sub-command(s).
COMMAND_MODULES = (
    "subjective.model_registry.cli",
    "subjective.model_registry.hybrid_cli",
    "subjective.data.cli",
    "subjective.evaluation.cli",
    "subjective.server.cli",
    "subjective.server.ledger.cli",
    "subjective.server.keys_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subjective", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
