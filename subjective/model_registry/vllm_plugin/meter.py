"""Per-request counts of one step, from the routing decisions taken, into compute_slots.

A step's counts are `count_flops` over the step's window of each request (its tokens, from the
position it starts at, over the gated layers' kept KV entries before it), so they add up exactly
to the reference meter over the whole request; the cost is that of the step's tokens only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from subjective.model_registry.compute_slots import WorkerSlots
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.flops import FlopReport, count_flops
from subjective.model_registry.vllm_plugin.batch import StepBatch


def decisions(batch: StepBatch, layers: list[int]) -> dict[int, Tensor]:
    """`{layer: [rows, max count]}` full-path masks of each row's tokens in this step."""
    counts = torch.tensor(batch.counts, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    columns = torch.arange(batch.num_tokens) - (counts.cumsum(0) - counts)[rows]
    out = {}
    for layer in layers:
        mask = torch.zeros(counts.numel(), int(counts.max()), dtype=torch.bool)
        mask[rows, columns] = batch.decisions[layer]
        out[layer] = mask
    return out


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


def step_counts(config: ModelConfig, batch: StepBatch) -> np.ndarray:
    """`[rows, len(compute_slots.FIELDS)]` int64 counts this step added to each request."""
    layers = config.routing.gated_layers
    counts = torch.tensor(batch.counts, dtype=torch.long)
    prompt_lens = torch.tensor([s.prompt_len for s in batch.states], dtype=torch.long)
    routing = decisions(batch, layers)
    report = count_flops(
        config,
        routing,
        counts,
        prompt_lens,
        starts=torch.tensor(batch.starts, dtype=torch.long),
        kept_before=batch.kept_before,
    )
    token_layers = counts * len(layers)
    kept = sum((mask.sum(dim=1) for mask in routing.values()), torch.zeros_like(counts))
    columns = [report_columns(report), token_layers[:, None], (token_layers - kept)[:, None]]
    return torch.cat(columns, 1).numpy().astype(np.int64)


class Meter:
    """Adds each step's counts to the requests' compute_slots rows (when a front end meters)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.slots = WorkerSlots.from_env()

    def finish_step(self, batch: StepBatch) -> None:
        for state, start, count in zip(batch.states, batch.starts, batch.counts, strict=True):
            state.processed = start + count
        if self.slots is None or not batch.states:
            return
        for state, counts in zip(batch.states, step_counts(self.config, batch), strict=True):
            if state.slot >= 0:
                self.slots.add(state.slot, state.tag, counts)
