"""Which layers should stay softmax: the KL-guided layer ranking, and choosing the kept layers.

From one all-linear stage-1 student, for each layer i a short stage-2 run (same data order and
seed for every i) with only layer i restored to softmax; the KL to the teacher reached on
held-out blocks ranks the layers (lower KL: softmax matters more there). The one-shot proxy
needs no training: the KL of the dense teacher with layer i alone made linear (the stage-1
linear attention in its place); higher proxy KL: the layer matters more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor
from tqdm import tqdm

from subjective.model_registry.distil import Plan, assemble, distil, held_out_kl, logits_of
from subjective.model_registry.hybrid import HybridForCausalLM
from subjective.model_registry.llama import LlamaForCausalLM

Selection = Literal["kl", "uniform"]


@dataclass
class LayerScore:
    layer: int
    kl: float  # KL(teacher ‖ hybrid) after the short stage-2 run with this layer softmax
    proxy_kl: float  # KL(teacher ‖ teacher with this layer alone linear), no training


def rank_layers_by_kl(
    teacher: LlamaForCausalLM,
    stage1: HybridForCausalLM,
    tokens: Tensor,
    eval_blocks: Tensor,
    plan: Plan,
    bf16: bool = False,
    progress: bool = True,
    done: Mapping[int, LayerScore] | None = None,
    on_score: Callable[[LayerScore], None] | None = None,
) -> list[LayerScore]:
    """Every layer's score, most important first (lowest KL after restoring it). Layers in
    `done` (an interrupted ranking's) are not rerun; `on_score` sees each new score."""
    plan = replace(plan, stage=2)
    layers = range(teacher.config.num_hidden_layers)
    reference = logits_of(teacher, eval_blocks)
    scores = []
    for i in tqdm(layers, desc="rank layers", disable=not progress):
        if done is not None and i in done:
            scores.append(done[i])
            continue
        student = assemble(teacher, [i], stage1).to(teacher.lm_head.weight.device)
        distil(teacher, student, tokens, plan, bf16=bf16, progress=False)
        kl = held_out_kl(reference, student, eval_blocks)
        del student
        others = [j for j in layers if j != i]
        proxy = assemble(teacher, others, stage1).to(teacher.lm_head.weight.device)
        scores.append(LayerScore(i, kl, held_out_kl(reference, proxy, eval_blocks)))
        if on_score is not None:
            on_score(scores[-1])
    return sorted(scores, key=lambda s: s.kl)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two score lists (no ties expected)."""
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def keep_count(keep: float, layers: int) -> int:
    """`--keep`: a count of softmax layers (an integer ≥ 1) or a share of the layers (< 1)."""
    count = int(keep) if keep >= 1 else round(keep * layers)
    if keep >= 1 and keep != int(keep):
        raise ValueError(f"--keep {keep}: a whole number of layers, or a share below 1")
    if not 1 <= count <= layers:
        raise ValueError(f"--keep {keep} keeps {count} of {layers} layers")
    return count


def select_layers(
    select: Selection, count: int, layers: int, ranking: list[int] | None = None
) -> list[int]:
    """The softmax layers: the top `count` of `ranking` (most important first), or a uniform
    interleave (layers ⌊(k+1)·n/count⌋ − 1: every 4th layer, the 4th first, at 0.25)."""
    if select == "kl":
        if ranking is None or sorted(ranking) != list(range(layers)):
            raise ValueError(f"the ranking must order all {layers} layers")
        return sorted(ranking[:count])
    return [(k + 1) * layers // count - 1 for k in range(count)]


def plot_scores(scores: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(scores, key=lambda s: s["layer"])
    layers = [s["layer"] for s in ordered]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    top.bar(layers, [s["kl"] for s in ordered], color="tab:blue")
    top.set_ylabel("KL after short stage 2")
    top.set_title("Layer i restored to softmax (lower KL: keep softmax there)")
    bottom.bar(layers, [s["proxy_kl"] for s in ordered], color="tab:orange")
    bottom.set_ylabel("proxy KL")
    bottom.set_title("One-shot proxy: dense with layer i alone linear (higher: keep softmax)")
    bottom.set_xlabel("layer")
    for ax in (top, bottom):
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
