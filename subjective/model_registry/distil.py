"""Distilling a dense Llama into a Gated DeltaNet hybrid (the KL-guided recipe, DESIGN.md §3).

- Stage 1 (`alignment_loss`): every layer linear; each linear layer's attention output is
  aligned to the teacher's attention output of the same layer by mean squared error, under
  teacher forcing (both attentions read the *teacher's* normed layer input, so the teacher's
  residual stream flows on); only the students' linear attentions train.
- Stage 2 (`kl_loss`): forward KL(teacher ‖ student) of the next-token distributions at every
  position; everything trains, the linear attentions at their own (higher) learning rate.

`distil` is the one training loop for both (AdamW, linear warm-up then cosine), resumable from
`OUTPUT/model` + `OUTPUT/state.pt`, with its loss history in `OUTPUT/history.jsonl` and a loss
curve in `OUTPUT/loss.png`. `assemble` builds any hybrid from the teacher and a stage-1 student:
softmax layers are the teacher's, linear layers the student's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from subjective.model_registry.config import LayerType
from subjective.model_registry.hybrid import HybridForCausalLM, hybridize
from subjective.model_registry.llama import LlamaForCausalLM
from subjective.model_registry.training_state import (
    STATE_FILE,
    load_training_state,
    optimizer_step,
    save_training_state,
)

Stage = Literal[1, 2]
MODEL_DIR = "model"


@dataclass
class Plan:
    """What a distillation run does: steps of `batch_size` random blocks of the training
    tokens (order fixed by `seed`), learning rates of the linear attentions and of the rest."""

    stage: Stage
    steps: int
    batch_size: int = 4
    block_size: int = 256
    lr_attention: float = 1e-3
    lr_rest: float = 0.0
    warmup: float = 0.1  # fraction of the steps
    seed: int = 0
    save_every: int = 50


def forward_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher ‖ student) between the softmax distributions, nats."""
    ref = F.log_softmax(teacher_logits.float().flatten(0, -2), -1)
    got = F.log_softmax(student_logits.float().flatten(0, -2), -1)
    return F.kl_div(got, ref, log_target=True, reduction="batchmean")


def layer_types_with(layers: int, softmax_layers: Sequence[int]) -> list[LayerType]:
    return ["full_attention" if i in softmax_layers else "linear_attention" for i in range(layers)]


@torch.no_grad()
def assemble(
    teacher: LlamaForCausalLM,
    softmax_layers: Sequence[int],
    linear_source: HybridForCausalLM | None = None,
) -> HybridForCausalLM:
    """The teacher with every layer outside `softmax_layers` linear; those layers' attention
    weights from `linear_source` (a stage-1 student), or initialised from the teacher's."""
    types = layer_types_with(teacher.config.num_hidden_layers, softmax_layers)
    model = hybridize(teacher, types)
    if linear_source is not None:
        for i in model.config.linear_layers:
            source = linear_source.model.layers[i].self_attn
            model.model.layers[i].self_attn.load_state_dict(source.state_dict())
    return model


def attention_parameter(name: str, linear_layers: Sequence[int]) -> bool:
    """True for the parameters of a linear layer's attention (the student's new attention)."""
    return name.startswith(tuple(f"model.layers.{i}.self_attn." for i in linear_layers))


def alignment_loss(teacher: LlamaForCausalLM, student: HybridForCausalLM, ids: Tensor) -> Tensor:
    """Stage 1: mean over linear layers of the MSE between the student's and the teacher's
    attention outputs, both computed from the teacher's normed input to that layer."""
    linear = student.config.linear_layers
    captured: dict[int, tuple[tuple, Tensor]] = {}

    def keep(index: int):
        def hook(_module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            captured[index] = (args, out)

        return hook

    hooks = [teacher.model.layers[i].self_attn.register_forward_hook(keep(i)) for i in linear]
    try:
        with torch.no_grad():
            teacher(ids, logits="none")
    finally:
        for hook in hooks:
            hook.remove()
    losses = []
    for i in linear:
        (x, positions, counts, _), target = captured[i]
        out = student.model.layers[i].self_attn(x, positions, counts, None)
        losses.append(F.mse_loss(out.float(), target.float()))
    return torch.stack(losses).mean()


def kl_loss(teacher: LlamaForCausalLM, student: HybridForCausalLM, ids: Tensor) -> Tensor:
    """Stage 2: KL(teacher ‖ student) per position, averaged."""
    with torch.no_grad():
        reference = teacher(ids, logits="all").logits
    return forward_kl(reference, student(ids, logits="all").logits)


LOSSES: dict[int, Callable[[LlamaForCausalLM, HybridForCausalLM, Tensor], Tensor]] = {
    1: alignment_loss,
    2: kl_loss,
}


def parameter_groups(student: HybridForCausalLM, plan: Plan) -> list[dict]:
    """Linear attentions at `lr_attention`; the rest at `lr_rest` in stage 2, frozen in 1."""
    linear = student.config.linear_layers
    attention, rest = [], []
    for name, param in student.named_parameters():
        is_attention = attention_parameter(name, linear)
        param.requires_grad_(is_attention or plan.stage == 2)
        if is_attention:
            attention.append(param)
        elif plan.stage == 2:
            rest.append(param)
    groups = [{"params": attention, "lr": plan.lr_attention}]
    if rest:
        groups.append({"params": rest, "lr": plan.lr_rest})
    return [g for g in groups if g["params"]]


def distil(
    teacher: LlamaForCausalLM,
    student: HybridForCausalLM,
    tokens: Tensor,
    plan: Plan,
    *,
    output: Path | None = None,
    resume: bool = False,
    save: Callable[[HybridForCausalLM, Path], None] | None = None,
    stop_after: int | None = None,
    bf16: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train `student` in place towards `teacher` on random blocks of `tokens`; returns the
    loss history. With `output`, checkpoints every `plan.save_every` steps and at the end
    (`save(student, OUTPUT/model)` plus the optimiser state); `resume` continues from there
    (the caller loads the student from `OUTPUT/model`). `stop_after`: stop (and save) after
    that many steps of this call, the schedule still spanning `plan.steps`."""
    from subjective.model_registry.train import lr_factor, sample_batch

    device = student.lm_head.weight.device
    teacher.eval().requires_grad_(False)
    student.train()
    groups = parameter_groups(student, plan)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(plan.warmup * plan.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, plan.steps, warmup)
    )
    generator = torch.Generator().manual_seed(plan.seed)
    step, history = 0, []
    state_file = output / STATE_FILE if output is not None else None
    if resume and state_file is not None and state_file.is_file():
        step, history = load_training_state(state_file, optimizer, schedule, generator)

    def checkpoint() -> None:
        if output is None:
            return
        if save is not None:
            save(student, output / MODEL_DIR)
        save_training_state(
            state_file, optimizer, schedule, generator, step, history, plan=asdict(plan)
        )
        plot_losses(history, output / "loss.png", f"stage {plan.stage}")

    loss_fn = LOSSES[plan.stage]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    stop_at = plan.steps if stop_after is None else min(plan.steps, step + stop_after)
    bar = tqdm(
        total=plan.steps, initial=step, desc=f"distil stage {plan.stage}", disable=not progress
    )
    while step < stop_at:
        ids = sample_batch(tokens, plan.batch_size, plan.block_size - 1, generator).to(device)
        with autocast:
            loss = loss_fn(teacher, student, ids)
        lr = optimizer_step(loss, params, optimizer, schedule)
        step += 1
        record = {"step": step, "loss": loss.item(), "lr": lr}
        history.append(record)
        if output is not None:
            with (output / "history.jsonl").open("a") as log:
                log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        bar.update(1)
        if step % plan.save_every == 0 or step == stop_at:
            checkpoint()
    bar.close()
    student.eval()
    return history


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("stage 1: attention MSE / stage 2: KL (nats)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def logits_of(model: LlamaForCausalLM, blocks: Tensor, batch_size: int = 4) -> Tensor:
    """All-position logits `[n, T, V]` of `blocks` `[n, T]`, on the CPU."""
    device = model.lm_head.weight.device
    return torch.cat([model(b.to(device)).logits.cpu() for b in blocks.split(batch_size)])


@torch.no_grad()
def held_out_kl(
    reference: Tensor, student: LlamaForCausalLM, blocks: Tensor, batch_size: int = 4
) -> float:
    """Mean KL(teacher ‖ student) per position over `blocks` `[n, T]`, the teacher's logits
    `reference` (`logits_of(teacher, blocks)`) computed once for many students."""
    device = student.lm_head.weight.device
    total = 0.0
    for batch, ref in zip(blocks.split(batch_size), reference.split(batch_size), strict=True):
        kl = forward_kl(ref.to(device), student(batch.to(device)).logits)
        total += float(kl) * batch.numel()
    return total / blocks.numel()
