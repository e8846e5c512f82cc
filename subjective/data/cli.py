"""`subjective data build`: the project's text corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from subjective.paths import DATA_DIR, DEFAULT_MODEL


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="build text corpora").add_subparsers(
        dest="data_command", required=True
    )
    build = data.add_parser("build", help="train/validation split of the Python docs")
    build.add_argument("--output", type=Path, default=DATA_DIR)
    build.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_MODEL, help="model folder whose tokens we count"
    )
    build.set_defaults(handler=build_data)


def build_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from subjective.data.corpus import build_corpus

    manifest = build_corpus(args.output, AutoTokenizer.from_pretrained(args.tokenizer))
    for split, stats in manifest["splits"].items():
        print(
            f"{split}: {stats['files']} files, {stats['characters']:,} characters, "
            f"{stats['tokens']:,} tokens -> {args.output / (split + '.txt')}"
        )
    return 0
