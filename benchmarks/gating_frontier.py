"""The quality–compute frontier of the gated models, and the recipe that makes the shipped ones.

One command, start to end, on a CPU (DESIGN.md §13, issue "gated models that keep the dense
model's answers"):

1. rank the dense model's layers by sensitivity to skipping (`subjective model rank-layers`,
   into `--ranking`; reused when that file exists);
2. collect the dense model's layer states on train-split calibration text, once;
3. for each variant (SDT/STT × ranked/alternating layers): convert, fit the skip-path priors
   and routers on those states (stage A), optionally distil with the base frozen (stage B,
   `--stage-b-steps`), and measure validation perplexity and the meter's counts over a sweep
   of thresholds; ablations on the ranked variants: no prior (skipped tokens keep H) and no
   sink tokens;
4. choose each ranked variant's quality levels on the validation sweep (conservative: least
   compute within +2 % perplexity, aggressive: within +5 %; when no threshold qualifies, the
   lowest-perplexity one), write them into its config with KV pages large enough for what they
   keep (vLLM's compacted pages cap the share of kept tokens), and with `--ship`
   copy its config and adapter to `adapters/` (what `make` installs as models/SmolLM2-SDT|STT).

    python benchmarks/gating_frontier.py --ship adapters

Writes `benchmarks/results/gating_frontier.json` and `.png` (perplexity vs executed FLOPs and
vs KV entries kept). Reductions are fractions of the dense model's figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from subjective.evaluation.compute import ComputeTotals, metered_logits_fn
from subjective.evaluation.perplexity import perplexity
from subjective.machine import machine_info
from subjective.model_registry.convert import ADAPTER_FILE, convert, load_model
from subjective.model_registry.layer_states import collect_layer_states, text_blocks
from subjective.model_registry.llama import LlamaForCausalLM
from subjective.model_registry.sensitivity import choose_layers
from subjective.model_registry.skip_fit import fit_folder

TARGETS = {"conservative": 1.02, "aggressive": 1.05}
VALIDATION_SEED = 1
NAMES = {"sdt": "SmolLM2-SDT", "stt": "SmolLM2-STT"}


@dataclass
class Variant:
    kind: str  # sdt | stt
    layers: str  # ranked | alternate
    gated: list[int]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.layers}-{len(self.gated)}"


def alternate_layers(kind: str, count: int, layers: int) -> list[int]:
    """`count` layers spread evenly over the odd layers (today's SDT/STT default is all odd)."""
    odd = list(range(1, layers, 2))
    step = (len(odd) - 1) / max(1, count - 1)
    return sorted({odd[round(i * step)] for i in range(count)})


def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor, threshold: float | None) -> dict:
    totals = ComputeTotals(model.config)
    with torch.no_grad():
        result = perplexity(metered_logits_fn(model, threshold, totals), blocks, 2, False)
    return {"perplexity": result.perplexity, **totals.summary(), "block_flops": totals.block_flops}


def monotonicity(sweep: list[dict]) -> dict[str, int]:
    """Block pairs of a sweep where the higher threshold executed more FLOPs: none for one gated
    layer (its scores do not depend on the threshold); with several, a decision upstream
    changes the inputs of later layers, so this is measured, not guaranteed."""
    ordered = sorted(sweep, key=lambda r: r["threshold"])
    pairs = violations = 0
    for low, high in zip(ordered, ordered[1:], strict=False):
        for a, b in zip(low["block_flops"], high["block_flops"], strict=True):
            pairs += 1
            violations += b > a
    return {"block_pairs": pairs, "violations": violations}


def build(variant: Variant, args: argparse.Namespace, states) -> Path:
    """Convert, fit (stage A), optionally distil (stage B); returns the variant's folder."""
    folder = args.work / variant.name
    convert(
        args.dense,
        folder,
        variant.kind,
        capacity=args.capacity,
        gated_layers=variant.gated,
        prior_width=args.prior_width,
    )
    fit_folder(folder, states, steps=args.steps, progress=False)
    if args.stage_b_steps:
        from subjective.cli import main as subjective

        run = args.work / f"{variant.name}-stage-b"
        subjective(
            ["train", str(folder), "--data", str(args.data), "--output", str(run),
             "--teacher", str(args.dense), "--freeze-base", "--routing", "router",
             "--steps", str(args.stage_b_steps), "--batch-size", "2", "--block-size", "256",
             "--lr", "1e-3", "--save-every", str(args.stage_b_steps)]
        )  # fmt: skip
        return run / "model"
    return folder


def ablated(folder: Path, ablation: str) -> LlamaForCausalLM:
    """The model in `folder` without its skip-path prior (skipped tokens keep H) or sinks."""
    copy = load_model(folder)
    if ablation == "no-prior":
        for name, param in copy.named_parameters():
            if name.endswith(("prior.down_proj.weight", "transition.down_proj.weight")):
                param.data.zero_()
    else:
        copy.config.routing.sink_tokens = 0
        for layer in copy.model.layers:
            if hasattr(layer, "sink_tokens"):
                layer.sink_tokens = 0
    return copy.eval()


def choose_quality(rows: list[dict], dense_ppl: float) -> dict[str, dict]:
    """Per level, the row with the least executed FLOPs within its perplexity target, else the
    row closest to the target (flagged)."""
    chosen = {}
    for level, limit in TARGETS.items():
        within = [r for r in rows if r["perplexity"] <= limit * dense_ppl]
        if within:
            best = min(within, key=lambda r: 1 - r["total_flop_reduction"])
            chosen[level] = best | {"target_met": True}
        else:
            best = min(rows, key=lambda r: r["perplexity"])
            chosen[level] = best | {"target_met": False}
    return chosen


def write_quality(folder: Path, chosen: dict[str, dict]) -> None:
    """The levels' thresholds as offsets from the base one, and KV pages (in quarters of a
    dense page, the kernels' granularity) that hold the most any level keeps."""
    raw = json.loads((folder / "config.json").read_text())
    routing = raw["routing"]
    routing["quality_offsets"] = {
        level: round(row["threshold"] - routing["threshold"], 4) for level, row in chosen.items()
    }
    most_kept = max(1 - row["kv_reduction_gated"] for row in chosen.values())
    routing["kv_capacity"] = min(1.0, math.ceil(most_kept * 4 - 1e-9) / 4)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["variant"] != "dense":
            groups.setdefault(f"{row['variant']} {row['setting']}", []).append(row)
    dense = next(r for r in rows if r["variant"] == "dense")["perplexity"]
    for ax, key, label in (
        (axes[0], "total_flop_reduction", "executed FLOPs / dense"),
        (axes[1], "kv_reduction_gated", "KV entries kept in the gated layers / dense"),
    ):
        for name, mine in sorted(groups.items()):
            mine = sorted(mine, key=lambda r: r[key])
            style = "o-" if len(mine) > 2 else "x"
            ax.plot([1 - r[key] for r in mine], [r["rel_perplexity"] for r in mine], style,
                    label=name, markersize=4)  # fmt: skip
        for level, limit in TARGETS.items():
            ax.axhline(limit, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(f"{level} target", (ax.get_xlim()[0], limit), fontsize=7)
        ax.set_xlabel(label)
        ax.set_yscale("log")
    axes[0].set_ylabel(f"perplexity / dense ({dense:.2f})")
    axes[1].legend(fontsize=7)
    fig.suptitle("Gated SmolLM2-135M on held-out text: quality vs compute")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, default=Path("models/SmolLM2-135M-Instruct"))
    parser.add_argument("--data", type=Path, default=Path("data/train.txt"))
    parser.add_argument("--text", type=Path, default=Path("data/validation.txt"))
    parser.add_argument("--work", type=Path, default=Path("runs/frontier"))
    parser.add_argument(
        "--ranking", type=Path, default=Path("benchmarks/results/layer_ranking.json")
    )
    parser.add_argument("--capacity", type=float, default=0.5)
    parser.add_argument("--num-gated", type=int, default=8)
    parser.add_argument("--prior-width", type=int, default=None)
    parser.add_argument("--calibration-blocks", type=int, default=16)
    parser.add_argument("--blocks", type=int, default=8, help="validation blocks")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=300, help="stage A steps per fit")
    parser.add_argument("--stage-b-steps", type=int, default=0)
    parser.add_argument(
        "--thresholds", type=lambda t: [float(x) for x in t.split(",")],
        default=[0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8],
    )  # fmt: skip
    parser.add_argument("--variants", default="sdt-ranked,stt-ranked,sdt-alternate")
    parser.add_argument("--ship", type=Path, help="copy the ranked variants' adapters here")
    parser.add_argument(
        "--output", type=Path, default=Path("benchmarks/results/gating_frontier.json")
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    if not args.ranking.is_file():
        from subjective.cli import main as subjective

        subjective(["model", "rank-layers", str(args.dense), "--capacity", str(args.capacity),
                    "--output", str(args.ranking)])  # fmt: skip
    ranking = json.loads(args.ranking.read_text())["layers"]
    dense = load_model(args.dense)
    states = collect_layer_states(
        dense, text_blocks(args.data, args.dense, args.calibration_blocks, args.block_size)
    )
    blocks = text_blocks(args.text, args.dense, args.blocks, args.block_size, seed=VALIDATION_SEED)
    dense_row = evaluate(dense, blocks, None)
    rows = [{"variant": "dense", "layers": [], "setting": "dense", "threshold": None,
             "quality_level": None} | dense_row]  # fmt: skip
    layers = dense.config.num_hidden_layers
    del dense
    chosen_levels, monotone = {}, {}
    for spec in args.variants.split(","):
        kind, how = spec.split("-")
        gated = (
            choose_layers(ranking, args.num_gated, kind)
            if how == "ranked"
            else alternate_layers(kind, args.num_gated, layers)
        )
        variant = Variant(kind, how, gated)
        folder = build(variant, args, states)
        model = load_model(folder).eval()
        sweep = []
        for threshold in args.thresholds:
            row = evaluate(model, blocks, threshold)
            sweep.append({"variant": kind, "layers": gated, "setting": f"{how}, prior, sinks",
                          "threshold": threshold, "quality_level": None} | row)  # fmt: skip
            print(f"{variant.name} t={threshold}: {row['perplexity']:.3f}", flush=True)
        rows += sweep
        monotone[variant.name] = monotonicity(sweep)
        if how != "ranked":
            continue
        gated_rows = [r for r in sweep if r["threshold"] > 0]
        levels = choose_quality(gated_rows, dense_row["perplexity"])
        write_quality(folder, levels)
        chosen_levels[kind] = {k: {"threshold": v["threshold"], "target_met": v["target_met"]}
                               for k, v in levels.items()}  # fmt: skip
        for level, row in levels.items():
            rows.append(row | {"quality_level": level})
        for ablation in ("no-prior", "no-sinks"):
            copy = ablated(folder, ablation)
            for level, row in levels.items():
                result = evaluate(copy, blocks, row["threshold"])
                rows.append({"variant": kind, "layers": gated, "threshold": row["threshold"],
                             "setting": f"{how}, {ablation}", "quality_level": level}
                            | result)  # fmt: skip
        if args.ship:
            target = args.ship / NAMES[kind]
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / ADAPTER_FILE, target / ADAPTER_FILE)
            raw = json.loads((folder / "config.json").read_text())
            raw.pop("base_model", None)
            (target / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for row in rows:
        row["rel_perplexity"] = row["perplexity"] / dense_row["perplexity"]
        row.pop("target_met", None)
        row.pop("block_flops", None)
    result = {
        "command": "python benchmarks/gating_frontier.py " + " ".join(sys.argv[1:]),
        "base": args.dense.name,
        "data": f"{args.text}: {args.blocks} blocks x {args.block_size} tokens",
        "validation": {
            "text": str(args.text),
            "blocks": args.blocks,
            "block_size": args.block_size,
            "seed": VALIDATION_SEED,
        },  # fmt: skip
        "calibration": f"{args.data}: {args.calibration_blocks} blocks x {args.block_size}",
        "capacity": args.capacity,
        "stage_b_steps": args.stage_b_steps,
        "quality_levels": chosen_levels,
        "threshold_monotonicity": monotone,
        "machine": machine_info(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.output.with_suffix(".png"))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
