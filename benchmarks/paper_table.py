"""The paper's table for our checkpoints: perplexity vs compute, measured side by side.

For the dense model and each gated checkpoint (at its base threshold and at each quality
level), on the same held-out blocks: perplexity (its change vs dense), executed vs dense FLOPs,
attention FLOPs of the gated layers vs dense (the paper's "-75%") and KV entries vs dense
(the paper's "-50%"). The gated models run their inference routing (causal router + threshold),
so the numbers are those decoding would give; FLOPs come from `count_flops`, i.e. the meter.

    python benchmarks/paper_table.py --dense models/SmolLM2-135M-Instruct \\
        --model runs/sdt/model --model runs/stt/model --text data/validation.txt
"""

from __future__ import annotations

import argparse
import json
import math
import time
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
    seconds = time.perf_counter() - start

    def ratio(a: str, b: str) -> float | None:
        return totals[a] / totals[b] if totals[b] else None

    return {
        "perplexity": math.exp(nll / tokens),
        "flops_ratio": ratio("flops", "dense_flops"),
        "gated_attention_ratio": ratio("gated_attention_flops", "gated_attention_flops_dense"),
        "kv_ratio": ratio("kv_entries", "kv_entries_dense"),
        "seconds": seconds,
        **totals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", type=Path, required=True)
    parser.add_argument("--model", type=Path, action="append", default=[])
    parser.add_argument("--text", type=Path, default=Path("data/validation.txt"))
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/paper_table.json"))
    args = parser.parse_args()

    blocks = held_out_blocks(args.text, args.dense, args.blocks, args.block_size)
    rows = []
    dense = load_model(args.dense).to(args.device)
    rows.append({"model": str(args.dense), "setting": "dense", **measure(dense, blocks, None, 1)})
    base_ppl = rows[0]["perplexity"]
    del dense
    for folder in args.model:
        model = load_model(folder).to(args.device)
        routing = model.config.routing
        settings = {"base": routing.threshold}
        settings.update({q: routing.threshold_for(q) for q in routing.quality_offsets})
        for name, threshold in settings.items():
            row = measure(model, blocks, threshold, args.batch)
            rows.append({"model": str(folder), "setting": f"{name} ({threshold:.2f})", **row})
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base_ppl - 1.0

    header = "| model | setting | ppl | Δppl | FLOPs | gated attn FLOPs | KV entries |"
    print(header)
    print("|" + "---|" * 7)
    for row in rows:

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{100 * value:.1f}%"

        print(
            f"| {Path(row['model']).name} | {row['setting']} | {row['perplexity']:.3f} | "
            f"{100 * row['perplexity_change']:+.1f}% | {pct(row['flops_ratio'])} | "
            f"{pct(row['gated_attention_ratio'])} | {pct(row['kv_ratio'])} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {"blocks": args.blocks, "block_size": args.block_size, "text": str(args.text)}
    args.output.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
