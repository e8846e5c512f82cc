"""The meter's front-end half: what one API request executed, from the worker or by count.

Models served by our vLLM plugin count their executed FLOPs per request inside the worker,
from the routing decisions taken, into a compute slot the front end lends the request
(`model_registry.compute_slots`). A model vLLM serves without the plugin (a plain Llama)
writes nothing there; for it every token took the full path, so the same `count_flops` gives
the figure from the tokens vLLM reports it ran (prompt tokens not served from vLLM's prefix
cache, plus every generated token fed back). A hybrid is counted that way too: its tokens all
take the full path, and `count_flops` knows its linear layers (no KV entries; `state_bytes`, the
recurrent state each sequence holds, in the dtype the engine keeps it in); its `dense_flops` are
those of the all-softmax model of its shape.

Either count has the LM head run on the last prompt token only. A request for prompt logprobs
(prompt scoring) has the engine compute the logits of every prompt token it runs: the meter
adds the LM head of the others, whatever path their layers took.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from subjective.model_registry.compute_slots import (
    EXTRA_ARG_SLOT,
    EXTRA_ARG_TAG,
    ComputeCounts,
    FrontEndSlots,
)
from subjective.model_registry.config import ModelConfig, RoutingConfig
from subjective.model_registry.flops import count_flops, state_elements
from subjective.server.protocol import ComputeUsage


@dataclass(frozen=True)
class Compute:
    """What one API request executed, all its prompts and samples together."""

    flops: int = 0
    dense_flops: int = 0
    kv_entries: int = 0
    kv_entries_dense: int = 0
    token_layers: int = 0
    token_layers_skipped: int = 0
    state_bytes: int = 0

    def __add__(self, other: Compute) -> Compute:
        return Compute(
            self.flops + other.flops,
            self.dense_flops + other.dense_flops,
            self.kv_entries + other.kv_entries,
            self.kv_entries_dense + other.kv_entries_dense,
            self.token_layers + other.token_layers,
            self.token_layers_skipped + other.token_layers_skipped,
            self.state_bytes + other.state_bytes,
        )

    def usage(self) -> ComputeUsage:
        saved = 1.0 - self.flops / self.dense_flops if self.dense_flops else 0.0
        return ComputeUsage(
            flops=self.flops,
            dense_flops=self.dense_flops,
            saved_ratio=saved,
            kv_entries=self.kv_entries,
            kv_entries_dense=self.kv_entries_dense,
            state_bytes=self.state_bytes,
        )

    @classmethod
    def of_counts(cls, counts: ComputeCounts) -> Compute:
        return cls(
            counts.flops,
            counts.dense_flops,
            counts.kv_entries,
            counts.kv_entries_dense,
            counts.token_layers,
            counts.token_layers_skipped,
        )


@dataclass(frozen=True)
class EngineTally:
    """One engine request (one prompt, one sample) as vLLM reported it."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_logprobs: bool = False  # logits of every prompt token it ran, not the last only


@dataclass(frozen=True)
class Ticket:
    slot: int
    tag: int

    def extra_args(self) -> dict[str, int]:
        return {EXTRA_ARG_SLOT: self.slot, EXTRA_ARG_TAG: self.tag}


class Meter:
    def __init__(
        self, model: ModelConfig, slots: FrontEndSlots, state_dtype: torch.dtype = torch.float32
    ) -> None:
        """`state_dtype`: the dtype the engine keeps a hybrid's recurrent state in (the server
        asks vLLM's config; float32 is the PyTorch reference's)."""
        self.model = model
        self.slots = slots
        # The count when every token takes the full path (plain Llama, hybrid).
        self._full_path = replace(model, routing=RoutingConfig())
        self._state_bytes = state_elements(model) * state_dtype.itemsize

    def open(self) -> Ticket:
        return Ticket(*self.slots.acquire())

    def release(self, ticket: Ticket) -> None:
        """The slot back to the pool, without reading it (the request never ran)."""
        self.slots.release(ticket.slot)

    def close(self, ticket: Ticket, tallies: list[EngineTally]) -> Compute:
        """The request's compute; the slot goes back to the pool."""
        try:
            counts = self.slots.read(ticket.slot)
        finally:
            self.release(ticket)
        return self.compute_of(counts, tallies)

    def compute_of(self, counts: ComputeCounts | None, tallies: list[EngineTally]) -> Compute:
        """From the worker's counts when it metered the request, else by count of tokens."""
        if counts is not None and counts.metered:
            return sum((self.prompt_head(t) for t in tallies), Compute.of_counts(counts))
        return sum((self.dense_compute(t) for t in tallies), Compute())

    def worst_case(
        self, prompt_lengths: list[int], n: int, max_tokens: int, prompt_logprobs: bool
    ) -> int:
        """An upper bound of the FLOPs a request can execute: every sample of every prompt
        runs the whole prompt (nothing cached) and `max_tokens` more tokens, every gated
        layer keeping every token (a kept token costs more than a skipped one)."""
        total = 0
        for length in prompt_lengths:
            tokens = length + max(max_tokens, 1)
            routing = {
                layer: torch.ones(1, tokens, dtype=torch.bool)
                for layer in self.model.routing.gated_layers
            }
            ran = count_flops(
                self.model,
                routing,
                [tokens],
                [length],
                prompt_logits="all" if prompt_logprobs else "last",
            )
            total += n * int(ran.prompt.flops[0] + ran.completion.flops[0])
        return total

    def prompt_head(self, tally: EngineTally) -> Compute:
        """The LM head on the prompt tokens it ran but the last (prompt logprobs only)."""
        if not tally.prompt_logprobs:
            return Compute()
        tokens = max(tally.prompt_tokens - tally.cached_tokens - 1, 0)
        flops = tokens * 2 * self.model.hidden_size * self.model.vocab_size
        return Compute(flops, flops)

    def dense_compute(self, tally: EngineTally) -> Compute:
        """Full-path FLOPs of the tokens vLLM ran: the prompt past its cached prefix, then
        each generated token but the last (the last one is sampled, never fed back); with
        prompt logprobs, the LM head on every prompt token it ran."""
        return self._dense_run(tally) + self.prompt_head(tally)

    def _dense_run(self, tally: EngineTally) -> Compute:
        fed = tally.prompt_tokens + max(tally.completion_tokens - 1, 0)
        ran = count_flops(
            self._full_path,
            {},
            [fed - tally.cached_tokens],
            [tally.prompt_tokens],
            starts=torch.tensor([tally.cached_tokens]),
        )
        p, c = ran.prompt, ran.completion
        return Compute(
            int(p.flops[0] + c.flops[0]),
            int(p.dense_flops[0] + c.dense_flops[0]),
            int(p.kv_entries[0] + c.kv_entries[0]),
            int(p.kv_entries_dense[0] + c.kv_entries_dense[0]),
            state_bytes=self._state_bytes,
        )
