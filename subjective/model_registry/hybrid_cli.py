"""`subjective hybrid distil|rank|build`: a dense Llama into a KL-guided Gated DeltaNet hybrid.

    subjective hybrid distil DENSE --stage 1 --output S1             # all-linear student
    subjective hybrid rank S1                                        # S1/hybrid_ranking.json+png
    subjective hybrid build S1 --keep 0.25 --select kl --output H    # softmax where it matters
    subjective hybrid distil DENSE --stage 2 --student H --output S2 # S2/model: the hybrid

Every run directory holds `distil.json` (what ran, the teacher), `model/` (an HF-format folder
`subjective eval ppl` and the server load), `state.pt` (resume with `--resume`),
`history.jsonl` and `loss.png`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from subjective.paths import DATA_DIR

RANKING_FILE = "hybrid_ranking.json"
RUN_FILE = "distil.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    hybrid = subparsers.add_parser(
        "hybrid", help="distil a dense model into a KL-guided linear/softmax attention hybrid"
    )
    commands = hybrid.add_subparsers(dest="hybrid_command", required=True)

    distil = commands.add_parser("distil", help="stage 1 (attention alignment) or 2 (logit KL)")
    distil.add_argument("dense", type=Path, help="the dense teacher (HF-format Llama folder)")
    distil.add_argument("--stage", type=int, choices=(1, 2), required=True)
    distil.add_argument(
        "--student",
        type=Path,
        help="stage 2: the hybrid folder to train (`hybrid build`); stage 1: default all-linear",
    )
    distil.add_argument("--output", type=Path, required=True)
    add_training_args(distil, steps=200)
    distil.add_argument(
        "--lr-attention", type=float, help="linear attentions (default: 1e-3 stage 1, 1e-4 stage 2)"
    )
    distil.add_argument(
        "--lr-rest", type=float, default=7e-6, help="stage 2: every other parameter"
    )
    distil.add_argument("--save-every", type=int, default=50)
    distil.add_argument("--resume", action="store_true", help="continue from OUTPUT's checkpoint")
    distil.add_argument("--stop-after", type=int, help="save and stop after this many steps now")
    distil.set_defaults(handler=distil_command)

    rank = commands.add_parser(
        "rank", help="per layer: short stage 2 with only that layer softmax; rank by KL reached"
    )
    rank.add_argument("stage1", type=Path, help="a stage-1 run directory")
    rank.add_argument("--teacher", type=Path, help="default: the stage-1 run's teacher")
    add_training_args(rank, steps=8)
    rank.add_argument("--lr-attention", type=float, default=1e-4)
    rank.add_argument("--lr-rest", type=float, default=7e-6)
    rank.add_argument("--eval-blocks", type=int, default=4, help="held-out blocks for the KL")
    rank.add_argument("--output", type=Path, help=f"default: STAGE1/{RANKING_FILE} (PNG beside)")
    rank.add_argument(
        "--resume", action="store_true", help="keep the layers an interrupted run already scored"
    )
    rank.set_defaults(handler=rank_command)

    build = commands.add_parser("build", help="a hybrid folder: chosen layers softmax, rest linear")
    build.add_argument("stage1", type=Path, help="a stage-1 run directory (its linear layers)")
    build.add_argument("--teacher", type=Path, help="default: the stage-1 run's teacher")
    build.add_argument(
        "--keep", type=float, required=True, help="softmax layers: a count, or a share below 1"
    )
    build.add_argument("--select", choices=("kl", "uniform"), default="kl")
    build.add_argument("--ranking", type=Path, help=f"default: STAGE1/{RANKING_FILE}")
    build.add_argument("--output", type=Path, required=True)
    build.set_defaults(handler=build_command)


def add_training_args(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--data", type=Path, default=DATA_DIR / "train.txt", help="training text")
    parser.add_argument("--token-cache", type=Path, help="tokenised text cache (default: OUTPUT)")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (1 is fastest on a busy shared CPU)"
    )


def device_of(args: argparse.Namespace):
    """The device to train on (and the CPU thread count `--threads` asks for)."""
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def training_tokens(args: argparse.Namespace, tokenizer_dir: Path, output: Path):
    from transformers import AutoTokenizer

    from subjective.model_registry.train import tokenize_file

    if not args.data.is_file():
        raise SystemExit(f"{args.data}: no such file")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenize_file(args.data, tokenizer, args.token_cache or output / "cache")


def load_dense(folder: Path):
    from subjective.model_registry.convert import load_model

    teacher = load_model(folder)
    if teacher.config.kind != "dense":
        raise SystemExit(f"{folder} is not a dense model: the teacher must be")
    return teacher


def invocation(args: argparse.Namespace) -> dict[str, str]:
    """The parsed arguments (what ran, however the command was called), as strings."""
    return {k: str(v) for k, v in vars(args).items() if k != "handler"}


def record_run(output: Path, args: argparse.Namespace, **fields) -> None:
    record = {"args": invocation(args), **fields}
    (output / RUN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")


def teacher_of(args: argparse.Namespace) -> Path:
    if args.teacher is not None:
        return args.teacher
    run = args.stage1 / RUN_FILE
    if not run.is_file():
        raise SystemExit(f"{args.stage1} is not a stage-1 run directory (no {RUN_FILE})")
    return Path(json.loads(run.read_text())["teacher"])


def distil_command(args: argparse.Namespace) -> int:
    import torch

    from subjective.model_registry.convert import load_model, save_model
    from subjective.model_registry.distil import MODEL_DIR, STATE_FILE, Plan, assemble, distil

    stage = args.stage
    if stage == 2 and args.student is None:
        raise SystemExit("--stage 2 needs --student (a hybrid folder from `hybrid build`)")
    torch.manual_seed(args.seed)
    device = device_of(args)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    teacher = load_dense(args.dense).to(device)
    resume = args.resume and (output / STATE_FILE).is_file()
    if resume:
        student = load_model(output / MODEL_DIR)
    elif args.student is not None:
        student = load_model(args.student)
    else:
        student = assemble(teacher, [])
    if student.config.kind != "hybrid":
        raise SystemExit(f"{args.student} has no linear layers: build a hybrid first")
    student = student.to(device)
    default_lr = 1e-3 if stage == 1 else 1e-4
    plan = Plan(
        stage=stage,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr_attention=default_lr if args.lr_attention is None else args.lr_attention,
        lr_rest=args.lr_rest if stage == 2 else 0.0,
        warmup=args.warmup,
        seed=args.seed,
        save_every=args.save_every,
    )
    record_run(output, args, teacher=args.dense.resolve(), student=args.student, plan=asdict(plan))
    template = json.loads((args.dense / "config.json").read_text())

    def save(model, folder: Path) -> None:
        save_model(
            model, folder, base_folder=None, template_config=template, tokenizer_from=args.dense
        )

    tokens = training_tokens(args, args.dense, output)
    history = distil(
        teacher,
        student,
        tokens,
        plan,
        output=output,
        resume=resume,
        save=save,
        stop_after=args.stop_after,
        bf16=args.bf16,
    )
    last = history[-1]["loss"] if history else float("nan")
    print(f"saved {output / MODEL_DIR} (step {len(history)}, loss {last:.4g})")
    return 0


def rank_command(args: argparse.Namespace) -> int:
    import torch

    from subjective.model_registry.convert import load_model
    from subjective.model_registry.distil import MODEL_DIR, Plan
    from subjective.model_registry.hybrid_rank import (
        LayerScore,
        plot_scores,
        rank_layers_by_kl,
        spearman,
    )
    from subjective.model_registry.layer_states import text_blocks

    torch.manual_seed(args.seed)
    device = device_of(args)
    teacher_dir = teacher_of(args)
    teacher = load_dense(teacher_dir).to(device)
    stage1 = load_model(args.stage1 / MODEL_DIR).to(device)
    if stage1.config.linear_layers != list(range(stage1.config.num_hidden_layers)):
        raise SystemExit(f"{args.stage1}: rank from the all-linear stage-1 student")
    plan = Plan(
        stage=2,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr_attention=args.lr_attention,
        lr_rest=args.lr_rest,
        warmup=args.warmup,
        seed=args.seed,
    )
    tokens = training_tokens(args, teacher_dir, args.stage1)
    # Held out: blocks at other random offsets of the text than the training draws' seed.
    held_out = text_blocks(
        args.data, teacher_dir, args.eval_blocks, args.block_size, seed=args.seed + 100
    )
    output = args.output or args.stage1 / RANKING_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    # Each layer's score as it comes, with what produced it, so that `--resume` can go on.
    partial = output.with_suffix(".partial.jsonl")
    setting = {"plan": asdict(plan), "eval_blocks": args.eval_blocks, "data": str(args.data)}
    done = {}
    if args.resume and partial.is_file():
        for line in partial.read_text().splitlines():
            entry = json.loads(line)
            if entry["setting"] != setting:
                raise SystemExit(f"{partial} was scored with other settings: {entry['setting']}")
            done[entry["score"]["layer"]] = LayerScore(**entry["score"])
    else:
        partial.unlink(missing_ok=True)

    def keep(score: LayerScore) -> None:
        with partial.open("a") as handle:
            handle.write(json.dumps({"setting": setting, "score": asdict(score)}) + "\n")

    scores = rank_layers_by_kl(
        teacher, stage1, tokens, held_out, plan, bf16=args.bf16, done=done, on_score=keep
    )
    results = [asdict(s) for s in scores]
    record = {
        "args": invocation(args),
        "teacher": str(teacher_dir),
        "ranking": [s.layer for s in scores],
        "proxy_ranking": [s.layer for s in sorted(scores, key=lambda s: -s.proxy_kl)],
        "spearman_kl_vs_proxy": spearman([-s.kl for s in scores], [s.proxy_kl for s in scores]),
        "plan": asdict(plan),
        "eval_blocks": args.eval_blocks,
        "layers": results,
    }
    output.write_text(json.dumps(record, indent=2) + "\n")
    plot_scores(results, output.with_suffix(".png"))
    partial.unlink(missing_ok=True)
    print(f"wrote {output} (keep softmax first: {', '.join(map(str, record['ranking']))})")
    return 0


def build_command(args: argparse.Namespace) -> int:
    from subjective.model_registry.convert import load_model, save_model
    from subjective.model_registry.distil import MODEL_DIR, assemble
    from subjective.model_registry.hybrid_rank import keep_count, select_layers

    teacher_dir = teacher_of(args)
    teacher = load_dense(teacher_dir)
    stage1 = load_model(args.stage1 / MODEL_DIR)
    layers = teacher.config.num_hidden_layers
    try:
        count = keep_count(args.keep, layers)
        ranking = None
        if args.select == "kl":
            path = args.ranking or args.stage1 / RANKING_FILE
            if not path.is_file():
                raise SystemExit(f"{path} is missing: run `subjective hybrid rank` first")
            ranking = json.loads(path.read_text())["ranking"]
        softmax = select_layers(args.select, count, layers, ranking)
    except ValueError as error:
        raise SystemExit(f"hybrid build: {error}") from None
    model = assemble(teacher, softmax, stage1)
    template = json.loads((teacher_dir / "config.json").read_text())
    save_model(
        model, args.output, base_folder=None, template_config=template, tokenizer_from=teacher_dir
    )
    record_run(
        args.output, args, teacher=teacher_dir.resolve(), select=args.select, softmax_layers=softmax
    )
    print(f"wrote {args.output} (softmax layers {softmax})")
    return 0
