"""Per-request counts of one step, from the routing decisions taken, into compute_slots.

A step's counts are `count_flops` over the step's window of each request (its tokens, from the
position it starts at, over the gated layers' kept KV entries before it), so they add up exactly
to the reference meter over the whole request; the cost is that of the step's tokens only. The
count runs once per step, on every row at once, and ends in one host copy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from subjective.model_registry.compute_slots import WorkerSlots
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.flops import FlopReport, count_flops
from subjective.model_registry.vllm_plugin.batch import StepBatch
from subjective.model_registry.vllm_plugin.requests import StateTable


def report_columns(report: FlopReport) -> Tensor:
    """`[rows, 6]`: the FLOP and KV columns of `FIELDS` (token-layer columns come apart)."""
    p, c = report.prompt, report.completion
    return torch.stack(
        [
            p.flops,
            p.dense_flops,
            c.flops,
            c.dense_flops,
            p.kv_entries + c.kv_entries,
            p.kv_entries_dense + c.kv_entries_dense,
        ],
        dim=1,
    )


def step_counts(config: ModelConfig, batch: StepBatch, prompt_lens: Tensor) -> np.ndarray:
    """`[rows, len(compute_slots.FIELDS)]` int64 counts this step added to each request."""
    layers = config.routing.gated_layers
    masks = batch.padded(batch.decisions.T, False).permute(2, 0, 1).cpu()  # [gated, rows, width]
    kept_start = batch.kept_start.cpu()
    report = count_flops(
        config,
        dict(zip(layers, masks, strict=True)),
        batch.counts.cpu(),
        prompt_lens.cpu(),
        starts=batch.starts.cpu(),
        kept_before={layer: kept_start[:, g] for g, layer in enumerate(layers)},
    )
    token_layers = batch.counts.cpu() * len(layers)
    kept = masks.sum(dim=(0, 2))
    columns = [report_columns(report), token_layers[:, None], (token_layers - kept)[:, None]]
    return torch.cat(columns, 1).numpy().astype(np.int64)


class Meter:
    """Adds each step's counts to the requests' compute_slots rows (when a front end meters)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.slots = WorkerSlots.from_env()

    def finish_step(self, batch: StepBatch, table: StateTable) -> None:
        if self.slots is None or not batch.states:
            return
        t = table.tensors
        counts = step_counts(self.config, batch, t["prompt_len"][batch.index])
        slots = t["slot"][batch.index].cpu().numpy()
        tags = t["tag"][batch.index].cpu().numpy()
        self.slots.add_many(slots, tags, counts)
