"""Which request each row of vLLM's persistent batch holds, and that request's gate state.

Model code cannot read `SamplingParams.extra_args` (vLLM issue 29277), but a v1 logits processor
sees every change of the persistent batch: `update_state` runs in `_update_states` (after the
batch is condensed and reordered, before `_prepare_inputs` and the forward), with the rows that
were added (with their `SamplingParams`), removed and moved. `RequestRows` mirrors that into the
process-wide `REGISTRY`, which the model reads at the start of its forward; the forward's tokens
are grouped by row in that same order (`attn_metadata.query_start_loc`).

Each request's gate state (kept KV entries, previous inputs, moving-average history, tokens
processed) is one row of `StateTable`'s preallocated tensors, so a step gathers and scatters it
in a few tensor operations.

A request leaves the persistent batch whenever a step does not schedule it and comes back later
as a new "added" row, so its state is keyed by the identity of its `SamplingParams` (one clone
per request, kept by the runner for the request's life) and dropped when that object dies.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from subjective.model_registry.compute_slots import EXTRA_ARG_SLOT, EXTRA_ARG_TAG
from subjective.model_registry.config import RoutingConfig
from subjective.model_registry.vllm_plugin import EXTRA_ARG_QUALITY, EXTRA_ARG_THRESHOLD

# Set (to anything) to keep every request's state by meter tag in `REGISTRY.recorded`: tests
# and diagnostics read the routing decisions the worker took from there (in-process engine).
RECORD_ENV = "SUBJECTIVE_RECORD_ROUTING"


@dataclass
class RequestState:
    """One request's routing inputs; its gate state lives in row `index` of the `StateTable`."""

    threshold: float | None  # None: the model config's threshold for `quality`
    quality: str | None
    slot: int  # compute_slots row, -1 when the request is not metered
    tag: int
    prompt_len: int
    index: int = -1  # row of `RowRegistry.table`
    # Gated layer -> decisions so far, kept only for recorded requests (`RECORD_ENV`).
    routing: dict[int, Tensor] | None = None

    def threshold_under(self, routing: RoutingConfig) -> float:
        return self.threshold if self.threshold is not None else routing.threshold_for(self.quality)


@dataclass
class StateTable:
    """Every live request's gate state as one row of preallocated tensors (grown by doubling).

    A step gathers its rows once (`StepBatch`), the layers update the gathered tensors, and the
    step scatters them back: no per-request Python work in the layers. Per row: the request's
    constants (threshold, prompt length, meter slot and tag, written at its first step),
    `processed` tokens, each gated layer's kept KV entries, STT's previous input `x_{t-1}` per
    gated layer, and the SDT gate mode's moving-average history (the last `window` D_st values,
    right-aligned, `history_len` of them valid) per gate-scored Decision layer.
    """

    gated: int = 0
    gate_layers: int = 0  # SDT Decision layers routing by their surprise gate
    hidden: int = 0  # 0 unless STT (previous inputs)
    window: int = 0
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    capacity: int = 0
    _free: list[int] = field(default_factory=list)
    _next: int = 0
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def configure(self, **shape: object) -> None:
        """Set the model's shapes (before its first step); keeps the lent rows."""
        for name, value in shape.items():
            setattr(self, name, value)
        self.capacity = 0
        self.tensors = {}

    def acquire(self) -> int:
        if self._free:
            return self._free.pop()
        self._next += 1
        return self._next - 1

    def release(self, index: int) -> None:
        self._free.append(index)

    def ensure(self, rows: int) -> None:
        """Room for row indices `< rows`: allocate or double, copying the existing rows."""
        if rows <= self.capacity:
            return
        capacity = max(rows, 2 * self.capacity, 16)
        long = {"dtype": torch.long, "device": self.device}
        value = {"dtype": self.dtype, "device": self.device}
        shapes = {
            "processed": ((capacity,), long),
            "prompt_len": ((capacity,), long),
            "slot": ((capacity,), long),
            "tag": ((capacity,), long),
            "threshold": ((capacity,), {"dtype": torch.float32, "device": self.device}),
            "kept": ((capacity, self.gated), long),
            "prev_input": ((capacity, self.gated if self.hidden else 0, self.hidden), value),
            "history": ((capacity, self.gate_layers, self.window), value),
            "history_len": ((capacity, self.gate_layers), long),
        }
        grown = {name: torch.zeros(shape, **kwargs) for name, (shape, kwargs) in shapes.items()}
        for name, old in self.tensors.items():
            grown[name][: old.shape[0]] = old
        self.tensors, self.capacity = grown, capacity


def state_from_params(params: SamplingParams, prompt_len: int) -> RequestState:
    extra = params.extra_args or {}
    threshold = extra.get(EXTRA_ARG_THRESHOLD)
    return RequestState(
        threshold=None if threshold is None else float(threshold),
        quality=extra.get(EXTRA_ARG_QUALITY),
        slot=int(extra.get(EXTRA_ARG_SLOT, -1)),
        tag=int(extra.get(EXTRA_ARG_TAG, 0)),
        prompt_len=prompt_len,
    )


class RowRegistry:
    """Row of the persistent batch -> `RequestState`, kept in step with vLLM's batch updates."""

    def __init__(self) -> None:
        self.rows: dict[int, RequestState] = {}
        self.batch_size = 0
        self.attached = False  # a `RequestRows` processor feeds this registry
        self._states: dict[int, RequestState] = {}
        self.recorded: dict[int, RequestState] = {}
        self.table = StateTable()
        self._ordered: tuple[list[RequestState], Tensor] | None = None  # until the next update

    def _state_of(self, params: SamplingParams, prompt: list[int] | None) -> RequestState:
        key = id(params)
        state = self._states.get(key)
        if state is None:
            state = state_from_params(params, len(prompt or ()))
            state.index = self.table.acquire()
            self._states[key] = state
            weakref.finalize(params, self._forget, key)
            if os.environ.get(RECORD_ENV):
                state.routing = {}
                self.recorded[state.tag] = state
        return state

    def _forget(self, key: int) -> None:
        state = self._states.pop(key, None)
        if state is not None:
            self.table.release(state.index)

    def apply(self, update: BatchUpdate | None) -> None:
        if update is None:
            return
        self._ordered = None
        for index in update.removed:
            self.rows.pop(index, None)
        for index, params, prompt, _output in update.added:
            self.rows[index] = self._state_of(params, prompt)
        for a, b, direction in update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.rows[a] = second
        self.batch_size = update.batch_size

    def ordered(self, num_rows: int) -> tuple[list[RequestState], Tensor] | None:
        """States of rows `0 .. num_rows-1` and their table rows `[num_rows]` (long, on the
        table's device), or None when they do not all exist (dummy runs). Cached until the next
        batch update, so a steady decode does no per-row work here."""
        if self._ordered is not None and len(self._ordered[0]) == num_rows:
            return self._ordered
        if num_rows != self.batch_size or any(r not in self.rows for r in range(num_rows)):
            return None
        states = [self.rows[r] for r in range(num_rows)]
        self.table.ensure(max((s.index for s in states), default=-1) + 1)
        index = torch.tensor([s.index for s in states], dtype=torch.long, device=self.table.device)
        self._ordered = (states, index)
        return self._ordered


REGISTRY = RowRegistry()


class RequestRows(LogitsProcessor):
    """A logits processor that changes no logit: it only feeds `REGISTRY` the batch updates."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        REGISTRY.rows.clear()
        REGISTRY.batch_size = 0
        REGISTRY._ordered = None
        REGISTRY.attached = True

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        REGISTRY.apply(batch_update)

    def apply(self, logits: Tensor) -> Tensor:
        return logits
