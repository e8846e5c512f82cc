"""`subjective train`: fine-tune a converted SDT/STT model (or, as their baseline, the dense one).

Loss = LM cross-entropy + w_prior·(prior / transition MSE) + w_router·router BCE
+ w_gate·mean(g) (STT) [+ w_distill·KL(teacher ‖ model) with `--teacher`, the dense model],
with Top-K routing by the surprise gate (DESIGN.md §3), or (`--routing router`) the inference
routing, whose skip-path priors then learn from the KL alone (stage B). AdamW, cosine
schedule with linear warm-up, β of the gates annealed linearly. Checkpoints in `OUTPUT/model`
(adapter only when the base is frozen, full weights otherwise) plus `OUTPUT/state.pt`
(optimizer, schedule, step, sampler), so `--resume` continues where a run stopped; the loss
history goes to `OUTPUT/history.jsonl` and `OUTPUT/loss.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune an SDT/STT (or dense) model on a text file")
    p.add_argument("model", type=Path, help="converted model folder")
    p.add_argument("--data", type=Path, required=True, help="training text file")
    p.add_argument("--validation", type=Path, help="held-out text file (loss per --eval-every)")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument(
        "--adapter-lr",
        type=float,
        help="learning rate of the fresh routing adapter (priors, routers; default: --lr)",
    )
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--freeze-base", action="store_true", help="train only the routing adapter")
    p.add_argument(
        "--routing",
        choices=("topk", "router"),
        default="topk",
        help="topk: the papers' Top-K by the surprise gate; router: the inference routing (router "
        "and threshold), so the skip-path priors learn the states the gated model really sees "
        "(stage B of the gating recipe, with --teacher and --freeze-base)",
    )
    p.add_argument("--prior-weight", type=float, default=0.05)
    p.add_argument("--router-weight", type=float, default=0.01)
    p.add_argument("--gate-weight", type=float, default=0.001)
    p.add_argument(
        "--teacher",
        type=Path,
        help="dense folder to distil from: adds the KL from its next-token distribution",
    )
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of that KL term")
    p.add_argument("--beta-start", type=float, default=1.0)
    p.add_argument("--beta-end", type=float, default=1.0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT's checkpoint")
    p.add_argument(
        "--stop-after", type=int, default=None, help="save and stop after this many steps now"
    )
    p.add_argument(
        "--time-budget-s",
        type=float,
        default=None,
        help="save and stop once this many seconds of training have passed (the schedule still "
        "spans --steps)",
    )
    p.set_defaults(handler=train_command)


def tokenize_file(path: Path, tokenizer, cache_dir: Path):
    """Token ids of a text file as int32 tensor, cached next to the run."""
    import hashlib

    import torch

    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir / f"tokens-{key[:12]}.pt"
    if cached.is_file():
        return torch.load(cached)
    ids: list[int] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        chunk: list[str] = []
        for line in handle:
            chunk.append(line)
            if len(chunk) >= 2000:
                ids.extend(tokenizer("".join(chunk))["input_ids"])
                chunk = []
        if chunk:
            ids.extend(tokenizer("".join(chunk))["input_ids"])
    tokens = torch.tensor(ids, dtype=torch.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(tokens, cached)
    return tokens


def sample_batch(tokens, batch: int, block: int, generator):
    import torch

    if tokens.numel() <= block + 1:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than a block of {block + 1}")
    starts = torch.randint(0, tokens.numel() - block - 1, (batch,), generator=generator)
    return torch.stack([tokens[s : s + block + 1] for s in starts.tolist()]).long()


def compute_loss(model, ids, args, teacher=None) -> tuple:
    """Total loss and its parts for one batch `[B, block + 1]` under `args.routing`; with a
    `teacher`, plus KL(teacher ‖ model) over each position's next-token distribution."""
    import torch
    import torch.nn.functional as F

    out = model(ids[:, :-1], topk=args.routing == "topk")
    logits = out.logits.flatten(0, 1).float()
    lm = F.cross_entropy(logits, ids[:, 1:].flatten())
    weights = {
        "prior_mse": args.prior_weight,
        "transition_mse": args.prior_weight,
        "router_bce": args.router_weight,
        "gate_mean": args.gate_weight,
    }
    total = lm
    parts = {"lm": lm.item()}
    if teacher is not None:
        from subjective.model_registry.distil import forward_kl

        with torch.no_grad():
            target = teacher(ids[:, :-1], logits="all").logits
        kl = forward_kl(target, logits)
        total = total + args.distill_weight * kl
        parts["distill_kl"] = kl.item()
    for name, value in out.aux.items():
        total = total + weights.get(name, 0.0) * value
        parts[name] = value.item()
    return total, parts


def plot_history(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "lm" in h]
    ax.plot(steps, [h["lm"] for h in history if "lm" in h], label="train LM loss")
    evals = [h for h in history if "val_lm" in h]
    if evals:
        steps = [h["step"] for h in evals]
        ax.plot(steps, [h["val_lm"] for h in evals], "o-", label="val LM (Top-K)")
        ax.plot(steps, [h["val_lm_router"] for h in evals], "s-", label="val LM (router)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_beta(model, beta: float) -> None:
    from subjective.model_registry.surprise import SurpriseGate

    for module in model.modules():
        if isinstance(module, SurpriseGate):
            module.set_beta(beta, beta)


def train_command(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from subjective.model_registry.convert import base_folder_of, load_model, save_model
    from subjective.model_registry.llama import is_base_parameter
    from subjective.model_registry.training_state import (
        STATE_FILE,
        load_training_state,
        optimizer_step,
        save_training_state,
    )

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    output: Path = args.output
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = output / "model"
    resume = args.resume and (output / STATE_FILE).is_file()
    source = checkpoint if resume else args.model
    base_folder = base_folder_of(args.model) if args.freeze_base else None
    model = load_model(source).to(device).train()
    if model.config.kind == "dense" and args.freeze_base:
        raise SystemExit(f"{args.model} is dense: it has no routing adapter to train alone")
    for name, param in model.named_parameters():
        param.requires_grad_(not (args.freeze_base and is_base_parameter(name)))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = []
    adapter_lr = args.lr if args.adapter_lr is None else args.adapter_lr
    for is_base, lr in ((True, args.lr), (False, adapter_lr)):
        part = [p for n, p in named if is_base_parameter(n) == is_base]
        decay = [p for p in part if p.dim() >= 2]
        no_decay = [p for p in part if p.dim() < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": args.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, int(args.warmup * args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.steps, warmup)
    )
    generator = torch.Generator().manual_seed(args.seed)
    step, history = 0, []
    if resume:
        step, history = load_training_state(output / STATE_FILE, optimizer, schedule, generator)

    teacher = None
    if args.teacher is not None:
        teacher = load_model(args.teacher).to(device).eval().requires_grad_(False)
        if teacher.config.kind != "dense":
            raise SystemExit(f"--teacher {args.teacher}: give the dense model")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokens = tokenize_file(args.data, tokenizer, output / "cache")
    val_tokens = (
        tokenize_file(args.validation, tokenizer, output / "cache") if args.validation else None
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def save() -> None:
        save_model(
            model,
            checkpoint,
            base_folder=base_folder,
            template_config=json.loads((args.model / "config.json").read_text()),
            tokenizer_from=args.model,
        )
        save_training_state(
            output / STATE_FILE,
            optimizer,
            schedule,
            generator,
            step,
            history,
            args={k: str(v) for k, v in vars(args).items() if k != "handler"},
        )
        plot_history(history, output / "loss.png")

    def evaluate() -> dict[str, float]:
        """Held-out LM loss with Top-K routing and with the inference router + threshold."""
        model.eval()
        val_gen = torch.Generator().manual_seed(1234)
        topk, router = [], []
        with torch.no_grad(), autocast:
            for _ in range(args.eval_blocks):
                ids = sample_batch(val_tokens, 1, args.block_size, val_gen).to(device)
                topk.append(compute_loss(model, ids, args)[1]["lm"])
                logits = model(ids[:, :-1], topk=False).logits.float()
                router.append(F.cross_entropy(logits[0], ids[0, 1:]).item())
        model.train()
        return {"val_lm": sum(topk) / len(topk), "val_lm_router": sum(router) / len(router)}

    progress = tqdm(total=args.steps, initial=step, desc="train")
    stop_at = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
    started = time.monotonic()
    while step < stop_at:
        set_beta(model, args.beta_start + (args.beta_end - args.beta_start) * step / args.steps)
        ids = sample_batch(tokens, args.batch_size, args.block_size, generator).to(device)
        with autocast:
            loss, parts = compute_loss(model, ids, args, teacher)
        lr = optimizer_step(loss, params, optimizer, schedule)
        step += 1
        record = {"step": step, "lr": lr, **parts}
        if val_tokens is not None and (step % args.eval_every == 0 or step == args.steps):
            record.update(evaluate())
        history.append(record)
        with (output / "history.jsonl").open("a") as log:
            log.write(json.dumps(record) + "\n")
        progress.set_postfix(lm=f"{parts['lm']:.3f}")
        progress.update(1)
        out_of_time = (
            args.time_budget_s is not None and time.monotonic() - started > args.time_budget_s
        )
        if step % args.save_every == 0 or step == stop_at or out_of_time:
            save()
        if out_of_time:
            break
    progress.close()
    print(f"saved {checkpoint} (step {step})")
    return 0
