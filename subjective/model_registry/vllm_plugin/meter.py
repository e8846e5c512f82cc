"""Per-request counts of one step, from the routing decisions taken, into compute_slots.

A step's counts are `count_flops` over each request's decisions up to the end of the step minus
the request's running totals before it, so they add up exactly to the reference meter over the
whole request.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from subjective.model_registry.compute_slots import WorkerSlots
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.flops import FlopReport, count_flops
from subjective.model_registry.vllm_plugin.batch import StepBatch


def decisions(batch: StepBatch, layers: list[int], width: int) -> dict[int, Tensor]:
    """`{layer: [rows, width]}` full-path masks over each row's tokens so far."""
    out = {}
    for layer in layers:
        mask = torch.zeros(len(batch.states), width, dtype=torch.bool)
        for r, state in enumerate(batch.states):
            history = state.routing[layer]
            mask[r, : history.numel()] = history
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
    starts = torch.tensor(batch.starts, dtype=torch.long)
    ends = starts + torch.tensor(batch.counts, dtype=torch.long)
    prompt_lens = torch.tensor([s.prompt_len for s in batch.states], dtype=torch.long)
    routing = decisions(batch, layers, int(ends.max()))
    after = report_columns(count_flops(config, routing, ends, prompt_lens))
    zero = torch.zeros(after.shape[1], dtype=after.dtype)
    before = torch.stack([zero if s.metered is None else s.metered for s in batch.states])
    for state, totals in zip(batch.states, after, strict=True):
        state.metered = totals
    token_layers = torch.tensor(batch.counts, dtype=torch.long) * len(layers)
    steps = torch.arange(int(ends.max()))
    in_step = (steps[None, :] >= starts[:, None]) & (steps[None, :] < ends[:, None])
    kept = sum((routing[layer] & in_step).sum(dim=1) for layer in layers)
    counts = torch.cat([after - before, token_layers[:, None], (token_layers - kept)[:, None]], 1)
    return counts.numpy().astype(np.int64)


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
