"""One forward step seen per request: token spans, thresholds and gate state of each row."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from vllm.forward_context import get_forward_context, is_forward_context_available

from subjective.model_registry.cache import GateState
from subjective.model_registry.config import RoutingConfig
from subjective.model_registry.vllm_plugin.requests import REGISTRY, RequestState


@dataclass
class StepBatch:
    """The real requests of a step; tokens `[0, num_tokens)` are grouped by row, in row order."""

    states: list[RequestState]
    counts: list[int]  # tokens of each row in this step
    starts: list[int]  # position of each row's first token in this step
    row_of_token: Tensor  # [num_tokens] long
    thresholds: Tensor  # [num_tokens] float: each token's request threshold
    block_table: Tensor  # [rows, blocks] vLLM's block table (one KV cache group)
    num_tokens: int
    kept_before: dict[int, Tensor]  # gated layer -> [rows] long: kept KV entries before the step
    decisions: dict[int, Tensor] = field(default_factory=dict)  # gated layer -> [num_tokens]

    def gate_state(self, layer: int) -> GateState:
        """The rows' moving-average history and previous input at `layer`, as the reference's."""
        return GateState(
            [s.d_st_history.get(layer) for s in self.states],
            [s.prev_input.get(layer) for s in self.states],
        )

    def keep_gate_state(self, layer: int, state: GateState) -> None:
        for s, history, prev in zip(self.states, state.d_st_history, state.prev_input, strict=True):
            s.d_st_history[layer] = history
            s.prev_input[layer] = prev

    def record(self, layer: int, selected: Tensor) -> None:
        """Keep a gated layer's decisions `[num_tokens]` for the meter (and recorded requests)."""
        self.decisions[layer] = selected.cpu()
        for s, piece in zip(self.states, self.decisions[layer].split(self.counts), strict=True):
            if s.routing is not None:
                earlier = s.routing.get(layer)
                s.routing[layer] = piece if earlier is None else torch.cat([earlier, piece])


def current_batch(positions: Tensor, routing: RoutingConfig) -> StepBatch | None:
    """The step's requests, or None for vLLM's profiling and dummy runs (no real requests)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not isinstance(metadata, dict) or not metadata:
        return None
    if not REGISTRY.attached:
        raise RuntimeError(
            "gated models need the RequestRows logits processor: build the engine with "
            "subjective.model_registry.vllm_plugin.engine_kwargs(model_dir)"
        )
    meta = next(iter(metadata.values()))
    query_start = meta.query_start_loc.cpu()
    states = REGISTRY.ordered(query_start.numel() - 1)
    if states is None:
        return None
    counts = query_start.diff().tolist()
    num_tokens = int(query_start[-1])
    starts = positions[query_start[:-1].to(positions.device)].tolist() if counts else []
    for state, start in zip(states, starts, strict=True):
        if start == 0:
            state.reset()
        elif start != state.processed:
            raise RuntimeError(
                f"request resumed at position {start}, its state is at {state.processed}"
            )
    row_of_token = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    thresholds = torch.tensor([s.threshold_under(routing) for s in states], dtype=torch.float32)
    return StepBatch(
        states=states,
        counts=counts,
        starts=starts,
        row_of_token=row_of_token.to(positions.device),
        thresholds=thresholds[row_of_token].to(positions.device),
        block_table=meta.block_table,
        num_tokens=num_tokens,
        kept_before={
            layer: torch.tensor([s.kept.get(layer, 0) for s in states], dtype=torch.long)
            for layer in routing.gated_layers
        },
    )
