"""KL-guided vs uniform hybrids of SmolLM2-135M at softmax ratios 0.25 and 0.5 (issue 12).

One command runs the whole recipe through the CLI (`subjective hybrid distil --stage 1`, `rank`,
`build --select kl|uniform`, `distil --stage 2`) in `--workdir`, then scores the teacher and every
hybrid on the validation split: perplexity, KL(teacher ‖ hybrid) per position, executed FLOPs per
token decoded at 2k context (the meter, `count_flops`), and KV + state bytes per sequence at 2k
and 8k tokens (KV entries in bf16, the linear layers' recurrent state in fp32). Writes
benchmarks/results/hybrid_table.json and .png (and the ranking's PNG beside them).

    nice -n 10 python benchmarks/hybrid_table.py          # CPU scale (defaults)
    python benchmarks/hybrid_table.py --stage1-steps 2000 --stage2-steps 1000 --rank-steps 50 \
        --rank-batch-size 8 --rank-block-size 1024 --rank-eval-blocks 16 --batch-size 16 \
        --block-size 1024 --eval-tokens 262144 --eval-block-size 1024 --threads 0 --bf16  # GPU

Rerunning resumes: finished stages are kept in the work directory (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
KV_BYTES, STATE_BYTES = 2, 4  # bf16 KV entries; the recurrent state accumulates in fp32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", type=Path, default=REPO / "models" / "SmolLM2-135M-Instruct")
    p.add_argument("--data", type=Path, default=REPO / "data" / "train.txt")
    p.add_argument("--validation", type=Path, default=REPO / "data" / "validation.txt")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "hybrid_table")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--stage1-steps", type=int, default=30)
    p.add_argument("--stage2-steps", type=int, default=5)
    p.add_argument("--rank-steps", type=int, default=1)
    p.add_argument("--rank-batch-size", type=int, default=1)
    p.add_argument("--rank-block-size", type=int, default=128)
    p.add_argument("--rank-eval-blocks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="validation tokens scored")
    p.add_argument("--eval-block-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--output", type=Path, default=RESULTS / "hybrid_table.json")
    return p.parse_args(argv)


def cli(*argv: object) -> None:
    from subjective.cli import main

    if main([str(a) for a in argv]) != 0:
        raise SystemExit(f"failed: subjective {shlex.join(map(str, argv))}")


def run_recipe(args: argparse.Namespace) -> tuple[dict, dict[tuple[float, str], Path]]:
    """Stage 1, ranking, the hybrids' builds and stage 2 (each skipped once done)."""
    work = args.workdir
    common = ["--data", args.data, "--token-cache", work / "cache", "--seed", 0]
    if args.threads:
        common += ["--threads", args.threads]
    if args.device:
        common += ["--device", args.device]
    if args.bf16:
        common.append("--bf16")
    train = [*common, "--batch-size", args.batch_size, "--block-size", args.block_size]
    stage1 = work / "stage1"
    cli("hybrid", "distil", args.teacher, "--stage", 1, *train,
        "--steps", args.stage1_steps, "--output", stage1, "--resume")  # fmt: skip
    ranking_file = stage1 / "hybrid_ranking.json"
    if not ranking_file.is_file():
        cli("hybrid", "rank", stage1, *common, "--steps", args.rank_steps,
            "--batch-size", args.rank_batch_size, "--block-size", args.rank_block_size,
            "--eval-blocks", args.rank_eval_blocks, "--resume")  # fmt: skip
    hybrids = {}
    for ratio in args.ratios:
        for select in ("kl", "uniform"):
            built = work / f"build-{select}-{ratio}"
            if not (built / "config.json").is_file():
                cli("hybrid", "build", stage1, "--keep", ratio, "--select", select,
                    "--output", built)  # fmt: skip
            trained = work / f"stage2-{select}-{ratio}"
            cli("hybrid", "distil", args.teacher, "--stage", 2, "--student", built, *train,
                "--steps", args.stage2_steps, "--output", trained, "--resume")  # fmt: skip
            hybrids[ratio, select] = trained / "model"
    return json.loads(ranking_file.read_text()), hybrids


def validation_blocks(args: argparse.Namespace) -> torch.Tensor:
    from transformers import AutoTokenizer

    from subjective.evaluation.perplexity import token_blocks

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    # The split's start, about 4 characters per token with room to spare.
    text = args.validation.read_text(encoding="utf-8")[: args.eval_tokens * 8]
    ids = tokenizer.encode(text, add_special_tokens=False)
    return token_blocks(ids, args.eval_block_size, args.eval_tokens)


def score(model, blocks: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Perplexity on `blocks` and mean KL(teacher ‖ model) per position (teacher: `reference`)."""
    from subjective.evaluation.perplexity import perplexity
    from subjective.model_registry.distil import held_out_kl

    device = model.lm_head.weight.device
    result = perplexity(lambda ids: model(ids.to(device)).logits, blocks, progress=False)
    return {"perplexity": result.perplexity, "kl_to_teacher": held_out_kl(reference, model, blocks)}


def costs(config) -> dict[str, float]:
    """Executed FLOPs of one token decoded after 2048 tokens; KV + state bytes per sequence."""
    from subjective.model_registry.flops import count_flops, sequence_memory_bytes

    report = count_flops(config, {}, torch.tensor([2049]), torch.tensor([2048]))
    memory = {
        f"memory_bytes_per_seq_{k}k": float(
            sequence_memory_bytes(config, k * 1024, KV_BYTES, STATE_BYTES)
        )
        for k in (2, 8)
    }
    return {"flops_per_token_2k": float(report.completion.flops[0]), **memory}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = rows[0]
    hybrids = rows[1:]
    ratios = sorted({r["softmax_ratio"] for r in hybrids})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.38
    for offset, select, color in ((-width / 2, "kl", "tab:blue"), (width / 2, "uniform", "grey")):
        chosen = [next(r for r in hybrids if r["variant"] == select and r["softmax_ratio"] == q)
                  for q in ratios]  # fmt: skip
        xs = [i + offset for i in range(len(ratios))]
        label = "KL-guided" if select == "kl" else "uniform"
        axes[0].bar(xs, [r["kl_to_teacher"] for r in chosen], width, color=color, label=label)
        axes[1].bar(xs, [r["perplexity"] for r in chosen], width, color=color, label=label)
        axes[2].bar(xs, [r["memory_bytes_per_seq_8k"] / 2**20 for r in chosen], width,
                    color=color, label=label)  # fmt: skip
    axes[1].axhline(teacher["perplexity"], color="black", ls="--", label="teacher")
    axes[2].axhline(teacher["memory_bytes_per_seq_8k"] / 2**20, color="black", ls="--",
                    label="teacher")  # fmt: skip
    titles = ("KL(teacher ‖ hybrid), nats/token", "validation perplexity", "KV + state at 8k, MiB")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks(range(len(ratios)), [f"softmax {q:g}" for q in ratios])
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from subjective.machine import machine_info
    from subjective.model_registry.convert import load_model
    from subjective.model_registry.distil import logits_of

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    ranking, hybrids = run_recipe(args)
    trained_s = time.monotonic() - started
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    teacher = load_model(args.teacher).to(device)
    blocks = validation_blocks(args)
    reference = logits_of(teacher, blocks)
    dense = teacher.config
    rows = [
        {
            "variant": "teacher",
            "softmax_ratio": 1.0,
            "softmax_layers": list(range(dense.num_hidden_layers)),
            **score(teacher, blocks, reference),
            **costs(dense),
        }
    ]
    del teacher
    for (ratio, select), folder in hybrids.items():
        model = load_model(folder).to(device)
        config = model.config
        rows.append(
            {
                "variant": select,
                "softmax_ratio": ratio,
                "softmax_layers": [
                    i for i in range(config.num_hidden_layers) if i not in config.linear_layers
                ],  # fmt: skip
                **score(model, blocks, reference),
                **costs(config),
            }
        )
    for row in rows:
        row["memory_vs_teacher_8k"] = (
            row["memory_bytes_per_seq_8k"] / rows[0]["memory_bytes_per_seq_8k"]
        )
        row["perplexity_vs_teacher"] = row["perplexity"] / rows[0]["perplexity"]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    record = {
        "command": shlex.join(["python", "benchmarks/hybrid_table.py", *sys.argv[1:]]),
        "teacher": args.teacher.name,
        "ranking": ranking["ranking"],
        "proxy_ranking": ranking["proxy_ranking"],
        "spearman_kl_vs_proxy": ranking["spearman_kl_vs_proxy"],
        "ranking_scores": ranking["layers"],
        "rows": rows,
        "eval_tokens": int(blocks.numel()),
        "kv_bytes": KV_BYTES,
        "state_bytes": STATE_BYTES,
        "settings": settings,
        "seconds": {"recipe": trained_s, "total": time.monotonic() - started},
        "machine": machine_info(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.output.with_suffix(".png"))
    shutil.copyfile(
        args.workdir / "stage1" / "hybrid_ranking.png",
        args.output.with_name(args.output.stem.replace("table", "ranking") + ".png"),
    )
    for row in rows:
        print(
            f"{row['variant']:8s} {row['softmax_ratio']:<5g} ppl {row['perplexity']:9.3f} "
            f"KL {row['kl_to_teacher']:.4f} FLOPs/token@2k {row['flops_per_token_2k']:.3e} "
            f"mem@8k {row['memory_vs_teacher_8k']:.1%} of the teacher's"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
