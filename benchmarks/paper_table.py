"""The paper's table for our checkpoints: perplexity vs compute, measured side by side.

For the dense model and each gated checkpoint (at its base threshold and at each quality
level), on the same held-out blocks: perplexity (its change vs dense), executed vs dense FLOPs,
attention FLOPs of the gated layers vs dense (the paper's "-75%") and KV entries vs dense
(the paper's "-50%"). The gated models run their inference routing (causal router + threshold),
so the numbers are those decoding would give; FLOPs come from `count_flops`, i.e. the meter.

    python benchmarks/paper_table.py --dense runs/paper/dense/model \\
        --model runs/paper/sdt/model --model runs/paper/stt/model --text data/validation.txt

`benchmarks/paper_table_cpu.sh` converts, fine-tunes and measures in one go.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

from subjective.model_registry.convert import load_model
from subjective.model_registry.flops import count_flops


def held_out_blocks(text_path: Path, tokenizer_dir: Path, blocks: int, block_size: int):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text[: 40 * blocks * block_size])["input_ids"]
    if len(ids) < blocks * block_size:
        raise SystemExit(f"{text_path}: only {len(ids)} tokens for {blocks}×{block_size}")
    # Evenly spaced, non-overlapping blocks: the same for every model.
    stride = len(ids) // blocks
    return torch.tensor([ids[i * stride : i * stride + block_size] for i in range(blocks)])


def measure(model, blocks: torch.Tensor, threshold: float | None, batch: int) -> dict:
    """Perplexity and the meter's totals over `blocks`, with the inference routing."""
    nll, tokens = 0.0, 0
    totals = dict.fromkeys(
        (
            "flops",
            "dense_flops",
            "gated_attention_flops",
            "gated_attention_flops_dense",
            "kv_entries",
            "kv_entries_dense",
        ),
        0,
    )
    block_flops: list[int] = []
    device = next(model.parameters()).device
    start = time.perf_counter()
    for i in range(0, blocks.shape[0], batch):
        ids = blocks[i : i + batch].to(device)
        with torch.no_grad():
            out = model(ids, threshold=threshold, logits="all")
        logits = out.logits[:, :-1].float()
        nll += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        tokens += ids[:, 1:].numel()
        lengths = torch.full((ids.shape[0],), ids.shape[1])
        report = count_flops(model.config, out.routing, lengths, lengths, prompt_logits="all")
        for key in totals:
            totals[key] += int(getattr(report.prompt, key).sum())
        block_flops += [int(f) for f in report.prompt.flops]
    # KV entries within the gated layers, as the paper counts them: the other layers keep all.
    config = model.config
    positions = blocks.numel()
    ungated = (config.num_hidden_layers - len(config.routing.gated_layers)) * positions
    gated_kv = totals["kv_entries"] - ungated
    gated_kv_dense = totals["kv_entries_dense"] - ungated

    def reduction(done: int, dense: int) -> float:
        return 1.0 - done / dense if dense else 0.0

    return {
        "perplexity": math.exp(nll / tokens),
        "dyn_attn_flop_reduction": reduction(
            totals["gated_attention_flops"], totals["gated_attention_flops_dense"]
        ),
        "total_flop_reduction": reduction(totals["flops"], totals["dense_flops"]),
        "kv_reduction": reduction(gated_kv, gated_kv_dense),
        "seconds": round(time.perf_counter() - start, 2),
        **totals,
        "block_flops": block_flops,
    }


def monotonicity(rows: list[dict]) -> dict:
    """Per gated run, the block pairs where a higher threshold executed more FLOPs.

    Exact for one gated layer; with several, a routing change in one layer changes the inputs
    (hence the scores) of later layers, so it is measured here, not guaranteed.
    """
    result = {}
    for run in sorted({r["run"] for r in rows if r["variant"] != "dense"}):
        mine = sorted((r for r in rows if r["run"] == run), key=lambda r: r["threshold"])
        pairs = violations = 0
        for low, high in pairwise(mine):
            if high["threshold"] == low["threshold"]:
                continue
            for a, b in zip(low["block_flops"], high["block_flops"], strict=True):
                pairs += 1
                violations += b > a
        result[run] = {"block_pairs": pairs, "violations": violations}
    return result


def plot(rows: list[dict], path: Path) -> None:
    """Perplexity against executed FLOPs (relative to dense), one marker per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant, marker in (("dense", "o"), ("sdt", "s"), ("stt", "^")):
        mine = [r for r in rows if r["variant"] == variant]
        ax.scatter(
            [1.0 - r["total_flop_reduction"] for r in mine],
            [r["perplexity"] for r in mine],
            marker=marker,
            label=variant,
        )
        for r in mine:
            ax.annotate(r["setting"], (1.0 - r["total_flop_reduction"], r["perplexity"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("executed FLOPs / dense FLOPs")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True, help="the dense baseline folder")
    parser.add_argument("--model", type=Path, action="append", default=[], help="SDT/STT folder")
    parser.add_argument("--text", type=Path, default=Path("data/validation.txt"))
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/paper_table.json"))
    parser.add_argument(
        "--threshold",
        type=float,
        action="append",
        default=[],
        help="also measure the gated models at this threshold (0: every token kept)",
    )
    parser.add_argument("--command", help="the command to record (default: this one)")
    parser.add_argument("--notes", help="what the numbers mean, recorded as is")
    parser.add_argument("--training", help="how the checkpoints were trained, recorded as is")
    args = parser.parse_args()

    blocks = held_out_blocks(args.text, args.dense, args.blocks, args.block_size)
    dense = load_model(args.dense).to(args.device).eval()
    dense_row = measure(dense, blocks, None, args.batch)
    rows = [{"variant": "dense", "run": args.dense.parent.name, "setting": "dense"} | dense_row]
    del dense
    for folder in args.model:
        model = load_model(folder).to(args.device).eval()
        routing = model.config.routing
        settings = [("base", routing.threshold)]
        settings += [(q, routing.threshold_for(q)) for q in routing.quality_offsets]
        settings += [("fixed", t) for t in args.threshold]
        for name, threshold in settings:
            row = measure(model, blocks, threshold, args.batch)
            run = folder.parent.name  # the training run's folder
            setting = f"{run}: {name} {threshold:.2f}"
            rows.append(
                {"variant": routing.kind, "run": run, "setting": setting, "threshold": threshold}
                | row
            )
    base_ppl = rows[0]["perplexity"]
    for row in rows:
        row["rel_perplexity"] = row["perplexity"] / base_ppl

    print("| variant | setting | ppl | rel. ppl | dyn. attn FLOPs | total FLOPs | KV (gated) |")
    print("|" + "---|" * 7)
    for row in rows:
        print(
            f"| {row['variant']} | {row['setting']} | {row['perplexity']:.3f} | "
            f"{row['rel_perplexity']:.3f} | {-100 * row['dyn_attn_flop_reduction']:+.1f}% | "
            f"{-100 * row['total_flop_reduction']:+.1f}% | {-100 * row['kv_reduction']:+.1f}% |"
        )
    command = args.command or "python benchmarks/paper_table.py " + " ".join(sys.argv[1:])
    result = {
        "command": command,
        "base": str(args.dense),
        "held_out": {"text": str(args.text), "blocks": args.blocks, "block_size": args.block_size},
        "machine": {"device": args.device, "platform": platform.platform(), "cpus": os.cpu_count()},
        "training": args.training,
        "notes": args.notes,
        "threshold_monotonicity": monotonicity(rows),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.output.with_suffix(".png"))
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
