"""`subjective eval ppl MODEL_DIR (--data validation | --text FILE)`: perplexity and compute."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from subjective.paths import DATA_DIR


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="measure model quality").add_subparsers(
        dest="eval_command", required=True
    )
    ppl = evaluate.add_parser(
        "ppl", help="perplexity and executed compute on a split of the corpus or a text file"
    )
    ppl.add_argument("model_dir", type=Path)
    source = ppl.add_mutually_exclusive_group()
    source.add_argument("--data", default="validation", help="split name: train | validation")
    source.add_argument("--text", type=Path, help="score this text file instead of a split")
    ppl.add_argument("--data-dir", type=Path, default=DATA_DIR)
    ppl.add_argument("--block-size", type=int, default=1024)
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens")
    ppl.add_argument(
        "--quality",
        choices=("aggressive", "conservative"),
        help="gated models: route at this quality's threshold (default: the base threshold)",
    )
    ppl.add_argument(
        "--threshold", type=float, help="gated models: route at this threshold (overrides quality)"
    )
    ppl.add_argument("--json", type=Path, help="also write the result here")
    ppl.set_defaults(handler=eval_ppl)


def eval_ppl(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from subjective.evaluation.compute import load_metered
    from subjective.evaluation.perplexity import perplexity, read_split, token_blocks

    if args.text is not None:
        if not args.text.is_file():
            raise SystemExit(f"{args.text}: no such file")
        text = args.text.read_text(encoding="utf-8", errors="replace")
    else:
        text = read_split(args.data_dir, args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    ids = tokenizer.encode(text, add_special_tokens=False)
    blocks = token_blocks(ids, args.block_size, args.max_tokens)
    logits_fn, totals = load_metered(args.model_dir, args.quality, args.threshold)
    result = perplexity(logits_fn, blocks, args.batch_size)
    compute = totals.summary()
    print(
        f"perplexity {result.perplexity:.4f} over {result.tokens:,} tokens "
        f"({result.tokens_per_second:,.0f} tokens/s); executed "
        f"{1 - compute['total_flop_reduction']:.1%} of the dense FLOPs, "
        f"{1 - compute['kv_reduction_total']:.1%} of its KV entries"
    )
    if args.json:
        record = {
            "model": args.model_dir.name,
            "data": str(args.text) if args.text is not None else args.data,
            "quality": args.quality,
            "threshold": args.threshold,
            "tokens": result.tokens,
            "perplexity": result.perplexity,
            "mean_nll": result.mean_nll,
            **compute,
            "tokens_per_second": result.tokens_per_second,
            "block_size": args.block_size,
            "command": shlex.join(["subjective", *sys.argv[1:]]),
            "machine": {
                "cpu": platform.machine(),
                "cores": os.cpu_count(),
                "os": platform.platform(),
            },
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0
