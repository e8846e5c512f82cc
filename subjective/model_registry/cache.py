"""Compacted per-layer KV cache for incremental decoding of gated models.

Each layer keeps, per sequence, only the entries of tokens that took its full path: keys
(rotary already applied), values and the tokens' original positions. A dense layer keeps every
token; a Dynamic/temporal layer keeps only the selected ones, so `len(layer.positions[b])`
is exactly that layer's KV entry count for sequence `b`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class LayerKV:
    """One layer's kept entries, one tensor per sequence: keys/values `[n, kv_heads, head_dim]`."""

    keys: list[Tensor | None]  # None: the sequence has kept nothing in this layer yet
    values: list[Tensor | None]
    positions: list[Tensor | None]

    @classmethod
    def empty(cls, batch: int) -> LayerKV:
        return cls([None] * batch, [None] * batch, [None] * batch)

    def lengths(self) -> list[int]:
        return [0 if p is None else int(p.numel()) for p in self.positions]

    def append(self, b: int, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        if self.keys[b] is None:
            self.keys[b], self.values[b], self.positions[b] = keys, values, positions
        else:
            self.keys[b] = torch.cat([self.keys[b], keys])
            self.values[b] = torch.cat([self.values[b], values])
            self.positions[b] = torch.cat([self.positions[b], positions])


@dataclass
class LinearState:
    """A linear-attention layer's recurrent state `[batch, heads, K, V]` (None before the first
    call): the same size however long the sequences grow, and no KV entries."""

    batch: int
    state: Tensor | None = None

    def lengths(self) -> list[int]:
        return [0] * self.batch


LayerCache = LayerKV | LinearState


@dataclass
class GateState:
    """Per-sequence state a gate needs across calls (causal moving average, previous token)."""

    d_st_history: list[Tensor | None]  # last `ma_window` D_st values that entered the average
    prev_input: list[Tensor | None]  # STT: the previous token's input to this layer `[d]`


@dataclass
class KVCache:
    """All layers' kept entries plus the gate state, for a batch of sequences."""

    layers: list[LayerCache]
    seq_lens: Tensor  # [batch] tokens already processed per sequence
    gates: dict[int, GateState] = field(default_factory=dict)

    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch: int,
        device: torch.device | str = "cpu",
        linear_layers: Collection[int] = (),
    ) -> KVCache:
        return cls(
            layers=[
                LinearState(batch) if i in linear_layers else LayerKV.empty(batch)
                for i in range(num_layers)
            ],
            seq_lens=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def gate_state(self, layer: int) -> GateState:
        batch = self.seq_lens.numel()
        if layer not in self.gates:
            self.gates[layer] = GateState([None] * batch, [None] * batch)
        return self.gates[layer]

    def kept_lengths(self) -> torch.Tensor:
        """`[num_layers, batch]` KV entries stored per layer and sequence."""
        return torch.tensor([layer.lengths() for layer in self.layers], dtype=torch.long)
