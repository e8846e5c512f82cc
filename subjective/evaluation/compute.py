"""Perplexity together with what the model executed: the meter's counts over scored blocks.

Any checkpoint the project serves (dense, SDT, STT, hybrid) runs through the reference models
with its inference routing (causal router + threshold), as decoding would route; `count_flops` (the
meter) counts each block with every position's logits computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from subjective.evaluation.perplexity import LogitsFn
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.flops import count_flops
from subjective.model_registry.llama import LlamaForCausalLM

COUNTED = (
    "flops",
    "dense_flops",
    "gated_attention_flops",
    "gated_attention_flops_dense",
    "kv_entries",
    "kv_entries_dense",
)


@dataclass
class ComputeTotals:
    """The meter's totals over every scored block, and each block's executed FLOPs."""

    config: ModelConfig
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTED, 0))
    positions: int = 0
    block_flops: list[int] = field(default_factory=list)

    def add(self, routing: dict[int, torch.Tensor], batch: int, length: int) -> None:
        lengths = torch.full((batch,), length)
        report = count_flops(self.config, routing, lengths, lengths, prompt_logits="all")
        for key in COUNTED:
            self.counts[key] += int(getattr(report.prompt, key).sum())
        self.positions += batch * length
        self.block_flops += [int(f) for f in report.prompt.flops]

    def summary(self) -> dict[str, float | int]:
        """Executed vs dense: FLOPs, gated-layer attention FLOPs, KV entries (in the layers that
        change, gated or linear, and in all)."""
        c = self.counts
        changed = len(self.config.routing.gated_layers) + len(self.config.linear_layers)
        ungated = self.config.num_hidden_layers - changed
        ungated_kv = ungated * self.positions
        return {
            "flops": c["flops"],
            "dense_flops": c["dense_flops"],
            "total_flop_reduction": reduction(c["flops"], c["dense_flops"]),
            "dyn_attn_flop_reduction": reduction(
                c["gated_attention_flops"], c["gated_attention_flops_dense"]
            ),
            "kv_reduction_gated": reduction(
                c["kv_entries"] - ungated_kv, c["kv_entries_dense"] - ungated_kv
            ),
            "kv_reduction_total": reduction(c["kv_entries"], c["kv_entries_dense"]),
        }


def reduction(done: int, dense: int) -> float:
    return 1.0 - done / dense if dense else 0.0


def metered_logits_fn(
    model: LlamaForCausalLM, threshold: float | None, totals: ComputeTotals
) -> LogitsFn:
    """Logits of `model` at `threshold` (None: the base threshold); each call adds its counts."""
    device = model.lm_head.weight.device

    def logits(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids.to(device), threshold=threshold, logits="all")
        totals.add(out.routing, ids.shape[0], ids.shape[1])
        return out.logits

    return logits


def load_metered(
    model_dir: Path, quality: str | None = None, threshold: float | None = None
) -> tuple[LogitsFn, ComputeTotals]:
    """A checkpoint as a metered logits function at `threshold`, else `quality`'s threshold."""
    from subjective.model_registry.convert import load_model

    model = load_model(model_dir).eval()
    if threshold is None and model.config.routing.kind != "dense":
        threshold = model.config.routing.threshold_for(quality)
    totals = ComputeTotals(model.config)
    return metered_logits_fn(model, threshold, totals), totals
