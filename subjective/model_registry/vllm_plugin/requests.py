"""Which request each row of vLLM's persistent batch holds, and that request's gate state.

Model code cannot read `SamplingParams.extra_args` (vLLM issue 29277), but a v1 logits processor
sees every change of the persistent batch: `update_state` runs in `_update_states` (after the
batch is condensed and reordered, before `_prepare_inputs` and the forward), with the rows that
were added (with their `SamplingParams`), removed and moved. `RequestRows` mirrors that into the
process-wide `REGISTRY`, which the model reads at the start of its forward; the forward's tokens
are grouped by row in that same order (`attn_metadata.query_start_loc`).

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
    """One request's routing inputs and the state its gates carry from step to step."""

    threshold: float | None  # None: the model config's threshold for `quality`
    quality: str | None
    slot: int  # compute_slots row, -1 when the request is not metered
    tag: int
    prompt_len: int
    kept: dict[int, int] = field(default_factory=dict)  # gated layer -> compacted KV entries
    d_st_history: dict[int, Tensor | None] = field(default_factory=dict)  # per gate layer
    prev_input: dict[int, Tensor | None] = field(default_factory=dict)  # STT: x_{t-1}
    # Gated layer -> decisions so far, kept only for recorded requests (`RECORD_ENV`).
    routing: dict[int, Tensor] | None = None
    processed: int = 0  # tokens executed so far (the next step starts at this position)

    def threshold_under(self, routing: RoutingConfig) -> float:
        return self.threshold if self.threshold is not None else routing.threshold_for(self.quality)

    def reset(self) -> None:
        """Start over (a preempted request recomputes from position 0)."""
        self.kept.clear()
        self.d_st_history.clear()
        self.prev_input.clear()
        if self.routing is not None:
            self.routing.clear()
        self.processed = 0


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

    def _state_of(self, params: SamplingParams, prompt: list[int] | None) -> RequestState:
        key = id(params)
        state = self._states.get(key)
        if state is None:
            state = state_from_params(params, len(prompt or ()))
            self._states[key] = state
            weakref.finalize(params, self._states.pop, key, None)
            if os.environ.get(RECORD_ENV):
                state.routing = {}
                self.recorded[state.tag] = state
        return state

    def apply(self, update: BatchUpdate | None) -> None:
        if update is None:
            return
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

    def ordered(self, num_rows: int) -> list[RequestState] | None:
        """States of rows `0 .. num_rows-1`, or None when they do not all exist (dummy runs)."""
        if num_rows != self.batch_size or any(r not in self.rows for r in range(num_rows)):
            return None
        return [self.rows[r] for r in range(num_rows)]


REGISTRY = RowRegistry()


class RequestRows(LogitsProcessor):
    """A logits processor that changes no logit: it only feeds `REGISTRY` the batch updates."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        REGISTRY.rows.clear()
        REGISTRY.batch_size = 0
        REGISTRY.attached = True

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        REGISTRY.apply(batch_update)

    def apply(self, logits: Tensor) -> Tensor:
        return logits
