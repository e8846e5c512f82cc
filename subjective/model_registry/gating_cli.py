"""`subjective model rank-layers` and `subjective model fit-skip`: the gating recipe's cheap
steps, run on the frozen dense model's own layer states (minutes on a CPU)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from subjective.model_registry.config import ModelConfig
from subjective.paths import DATA_DIR

RANKING_FILE = "layer_ranking.json"


def register(commands: argparse._SubParsersAction) -> None:
    rank = commands.add_parser(
        "rank-layers",
        help="KL(dense ‖ gated) with one layer gated at a time: which layers tolerate skipping",
    )
    rank.add_argument("dense", type=Path, help="dense HF-format Llama folder")
    rank.add_argument("--capacity", type=float, default=0.5, help="share of tokens kept (γ)")
    add_calibration_args(rank)
    rank.add_argument("--eval-blocks", type=int, default=4, help="blocks the KL is measured on")
    rank.add_argument(
        "--output", type=Path, help=f"ranking JSON (default: DENSE/{RANKING_FILE}; PNG beside)"
    )
    rank.set_defaults(handler=rank_layers_command)

    fit = commands.add_parser(
        "fit-skip",
        help="stage A: fit the gated layers' priors and routers on the dense layer states",
    )
    fit.add_argument("model", type=Path, help="converted SDT/STT folder (its adapter is rewritten)")
    add_calibration_args(fit)
    fit.set_defaults(handler=fit_skip_command)


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, default=DATA_DIR / "train.txt", help="calibration text (train split)"
    )
    parser.add_argument("--blocks", type=int, default=16, help="calibration blocks")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per fit")
    parser.add_argument("--seed", type=int, default=0)


def calibration_states(model, tokenizer_dir: Path, args: argparse.Namespace, seed: int):
    from subjective.model_registry.layer_states import collect_layer_states, text_blocks

    ids = text_blocks(args.data, tokenizer_dir, args.blocks, args.block_size, seed=seed)
    return collect_layer_states(model, ids)


def rank_layers_command(args: argparse.Namespace) -> int:
    import torch

    from subjective.model_registry.layer_states import text_blocks
    from subjective.model_registry.llama import LlamaForCausalLM
    from subjective.model_registry.sensitivity import plot_ranking, rank_layers

    if not 0.0 < args.capacity < 1.0:
        raise SystemExit("--capacity must lie in (0, 1)")
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM.from_pretrained(args.dense)
    states = calibration_states(model, args.dense, args, args.seed)
    held_out = text_blocks(
        args.data, args.dense, args.eval_blocks, args.block_size, seed=args.seed + 100
    )
    ranking = rank_layers(model, states, held_out, args.capacity)
    results = [r.__dict__ for r in ranking]
    output = args.output or args.dense / RANKING_FILE
    record = {
        "command": shlex.join(["subjective", *sys.argv[1:]]),
        "base": args.dense.name,
        "capacity": args.capacity,
        "data": str(args.data),
        "layers": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(record, indent=2) + "\n")
    plot_ranking(results, args.capacity, output.with_suffix(".png"))
    order = ", ".join(str(r["layer"]) for r in results)
    print(f"wrote {output} (least sensitive first: {order})")
    return 0


def fit_skip_command(args: argparse.Namespace) -> int:
    import torch

    from subjective.model_registry.convert import base_folder_of, load_model
    from subjective.model_registry.skip_fit import fit_folder

    torch.manual_seed(args.seed)
    if ModelConfig.from_folder(args.model).kind == "dense":
        raise SystemExit(f"{args.model} is dense: convert it first")
    # Every token kept, the gated model is exactly the dense one: its layer states are the base's.
    base = load_model(base_folder_of(args.model))
    states = calibration_states(base, args.model, args, args.seed)
    del base
    fits = fit_folder(args.model, states, steps=args.steps)
    for fit in fits:
        print(
            f"layer {fit['layer']:2d}: prior misses {fit['prior_relative_mse']:.1%} of the update,"
            f" router keeps {fit['kept_share']:.0%} and {fit['router_recall']:.0%} of the marked"
        )
    return 0
