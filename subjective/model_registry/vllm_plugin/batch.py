"""One forward step seen per request: its rows' token spans, thresholds and gate state, as tensors.

`current_batch` gathers the step's rows of the `StateTable` once; the layers read and update
those gathered tensors (no per-request Python work, no host read per layer beyond the kept
count a gated layer needs to size its block); `StepBatch.finish` scatters them back. The step's
only host reads are the metadata vLLM already holds on the host and one check of the rows'
positions against their state (which also finds the requests starting this step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from vllm.forward_context import get_forward_context, is_forward_context_available

from subjective.model_registry.config import RoutingConfig
from subjective.model_registry.vllm_plugin.requests import REGISTRY, RequestState, StateTable


@dataclass
class StepBatch:
    """The real requests of a step; tokens `[0, num_tokens)` are grouped by row, in row order.

    Per-layer state is indexed by the layer's place in `gated_layers` (`kept`, `prev_input`,
    `decisions`) or among the gate-scored Decision layers (`history`, `history_len`).
    """

    states: list[RequestState]
    gated_layers: list[int]
    index: Tensor  # [rows] long: the rows' `StateTable` rows
    num_tokens: int
    max_query_len: int  # most tokens of one row in this step (vLLM's, on the host)
    max_seq_len: int
    counts: Tensor  # [rows] long: tokens of each row in this step
    first_token: Tensor  # [rows] long: index of each row's first token in the step
    starts: Tensor  # [rows] long: position of each row's first token
    row_of_token: Tensor  # [num_tokens] long
    column_of_token: Tensor  # [num_tokens] long: the token's rank within its row
    cuts: Tensor  # [num_tokens] float: logit of each token's request threshold
    block_table: Tensor  # [rows, blocks] vLLM's block table (one KV cache group)
    kept_start: Tensor  # [rows, gated] kept KV entries before the step
    kept: Tensor  # [rows, gated] kept KV entries so far (each gated layer adds its own)
    prev_input: Tensor  # [rows, gated, d] STT: each row's input before its first token
    history: Tensor  # [rows, gate layers, window] SDT gate mode: D_st history, right-aligned
    history_len: Tensor  # [rows, gate layers] valid history values
    decisions: Tensor  # [gated, num_tokens] bool: full path taken

    @property
    def rows(self) -> int:
        return self.counts.numel()

    @property
    def decode(self) -> bool:
        """At most one token per row (every row decoding)."""
        return self.max_query_len == 1

    @property
    def last_token(self) -> Tensor:
        return self.first_token + self.counts - 1

    def padded(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """`[num_tokens, ...]` values as `[rows, max_query_len, ...]`, `fill` past each row."""
        out = values.new_full((self.rows, self.max_query_len, *values.shape[1:]), fill)
        out[self.row_of_token, self.column_of_token] = values
        return out

    def finish(self, table: StateTable) -> None:
        """Store the rows' state back into the table: the step is over."""
        t, index = table.tensors, self.index
        t["processed"][index] = self.starts + self.counts
        t["kept"][index] = self.kept
        if self.prev_input.numel():
            t["prev_input"][index] = self.prev_input
        if self.history.numel():
            t["history"][index] = self.history
            t["history_len"][index] = self.history_len
        recorded = [(r, s) for r, s in enumerate(self.states) if s.routing is not None]
        if recorded:
            record(self, recorded)


def record(batch: StepBatch, recorded: list[tuple[int, RequestState]]) -> None:
    """Append this step's decisions to the recorded requests' routing (tests, diagnostics)."""
    per_row = batch.padded(batch.decisions.T, False).cpu()  # [rows, width, gated]
    counts = batch.counts.tolist()
    for row, state in recorded:
        mine = per_row[row, : counts[row]]
        for g, layer in enumerate(batch.gated_layers):
            earlier = state.routing.get(layer)
            state.routing[layer] = (
                mine[:, g] if earlier is None else torch.cat([earlier, mine[:, g]])
            )


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
    ordered = REGISTRY.ordered(meta.query_start_loc.numel() - 1)
    if ordered is None:
        return None
    states, index = ordered
    device = positions.device
    n = int(meta.num_actual_tokens)
    query_start = meta.query_start_loc.to(device=device, dtype=torch.long)
    counts, first = query_start.diff(), query_start[:-1]
    rows = torch.arange(counts.numel(), device=device)
    row_of_token = torch.repeat_interleave(rows, counts, output_size=n)
    table = REGISTRY.table
    starts = positions[:n][first.clamp(max=max(n - 1, 0))].long()
    begin_requests(table, states, index, starts, routing)
    t = table.tensors
    kept = t["kept"][index]
    return StepBatch(
        states=states,
        gated_layers=routing.gated_layers,
        index=index,
        num_tokens=n,
        max_query_len=int(meta.max_query_len),
        max_seq_len=int(meta.max_seq_len),
        counts=counts,
        first_token=first,
        starts=starts,
        row_of_token=row_of_token,
        column_of_token=torch.arange(n, device=device) - first[row_of_token],
        cuts=torch.logit(t["threshold"][index].clamp(0.0, 1.0))[row_of_token],
        block_table=meta.block_table,
        kept_start=kept.clone(),
        kept=kept,
        prev_input=t["prev_input"][index],
        history=t["history"][index],
        history_len=t["history_len"][index],
        decisions=torch.zeros(len(routing.gated_layers), n, dtype=torch.bool, device=device),
    )


def begin_requests(
    table: StateTable,
    states: list[RequestState],
    index: Tensor,
    starts: Tensor,
    routing: RoutingConfig,
) -> None:
    """Check each row resumes where its state stopped; (re)start the rows at position 0.

    One host read per step. A request at position 0 (new, or preempted and recomputed) gets
    its constants written and its state zeroed.
    """
    t = table.tensors
    fresh = starts == 0
    wrong = (starts != t["processed"][index]) & ~fresh
    any_fresh, any_wrong = torch.stack([fresh.any(), wrong.any()]).tolist()
    if any_wrong:
        row = int(wrong.nonzero()[0, 0])
        raise RuntimeError(
            f"request resumed at position {int(starts[row])}, "
            f"its state is at {int(t['processed'][index[row]])}"
        )
    if not any_fresh:
        return
    for row in fresh.nonzero().flatten().tolist():
        state, i = states[row], int(index[row])
        for name in ("processed", "kept", "prev_input", "history", "history_len"):
            t[name][i] = 0
        t["threshold"][i] = state.threshold_under(routing)
        t["prompt_len"][i] = state.prompt_len
        t["slot"][i] = state.slot
        t["tag"][i] = state.tag
        if state.routing is not None:
            state.routing.clear()
