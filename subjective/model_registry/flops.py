"""The meter: executed and dense-equivalent FLOPs and KV entries of a batch, per sequence/phase.

Convention: a matmul `[m, k] @ [k, n]` costs `2·m·n·k`. Counted, per layer and token:

- full path (every token of a dense/Decision layer; selected tokens of a Dynamic/temporal
  layer): Q, K, V, O projections `2·d·(H + 2·H_kv)·hd + 2·H·hd·d`; attention over the
  `L` KV entries the token attends in that layer (kept entries at positions ≤ its own,
  itself included) `2·2·H·hd·L` (scores and weighted sum); SwiGLU MLP `3·2·d·I`;
- SDT Decision layer, every token, only when the routing `score` is `"gate"` (g is then the
  Dynamic layer's score): its prior SwiGLU `3·2·d·p` and surprise `2·2·d` (the two squared
  distances `D_st`, `D_ch`, each a length-d dot product);
- SDT Dynamic layer, every token: router `2·d` (linear d → 1), unless the `score` is `"gate"`;
  skipped tokens: the layer's prior SwiGLU `3·2·d·p` (the skip path);
- STT temporal layer, every token: router `2·2d`; skipped tokens: the transition SwiGLU
  `3·2·d·t` (the skip path's prior);
- hybrid linear-attention (Gated DeltaNet) layer, every token: projections q, k, v, g
  `4·2·d·H·hd`, o `2·H·hd·d`, decay and β `2·2·d·H`; MLP as above; the delta rule per head
  with a `hd × hd` state: a completion token (decode, recurrent form) `6·hd²` (state readout
  of k, write, readout of q); a prompt token (prefill, chunked form with C = 64, amortised
  over whole chunks) `6·hd² + 6·C·hd` (the chunk's state terms and its intra-chunk K Kᵀ, Q Kᵀ
  and weights·U products) `+ 2·(C-1)·hd` (the two unit-triangular solves, which torch's
  counter does not see). No KV entries: a constant state per sequence (`state_elements`);
- LM head `2·d·V` per token whose logits are computed (prompt: the last prompt token, or all
  with `prompt_logits="all"`; completion: every token fed back); embeddings: 0 (a lookup).

Ignored everywhere (elementwise or O(d) work): RMSNorms, rotary, activations, residual adds,
the g scaling, softmax, attention scaling/masking, sigmoid/threshold comparisons, the moving
average and biases. This matches what `torch.utils.flop_counter` counts on the reference models,
except that the reference attention computes the full `n × L` score rectangle of a prompt chunk
and masks the causal part: those masked pairs are not attended and are not counted here; and
that the reference linear layers pad each prefill row to whole chunks (padding not counted).

`dense_flops` is what the dense model of the same shape executes for the same tokens: every
layer on the full path with causal attention over all earlier tokens, no prior/router/surprise,
the same LM-head tokens. KV entries: one per layer and full-path token (dense: every token).

Only inference routing is metered; training's extra dense measuring pass (STT) is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from subjective.model_registry.config import ModelConfig
from subjective.model_registry.delta_rule import CHUNK_SIZE


@dataclass
class PhaseCounts:
    """Per-sequence int64 `[B]` totals of one phase."""

    flops: Tensor
    dense_flops: Tensor
    kv_entries: Tensor
    kv_entries_dense: Tensor
    # Attention (scores + weighted sum) in the gated layers only: the paper's headline figure.
    gated_attention_flops: Tensor
    gated_attention_flops_dense: Tensor


@dataclass
class FlopReport:
    prompt: PhaseCounts
    completion: PhaseCounts

    def usage(self, b: int) -> dict[str, float | int]:
        """`usage.compute` of sequence `b` (both phases together), as DESIGN.md §5 names it."""
        flops = int(self.prompt.flops[b] + self.completion.flops[b])
        dense = int(self.prompt.dense_flops[b] + self.completion.dense_flops[b])
        return {
            "flops": flops,
            "dense_flops": dense,
            "saved_ratio": 1.0 - flops / dense if dense else 0.0,
            "kv_entries": int(self.prompt.kv_entries[b] + self.completion.kv_entries[b]),
            "kv_entries_dense": int(
                self.prompt.kv_entries_dense[b] + self.completion.kv_entries_dense[b]
            ),
        }


def count_flops(
    config: ModelConfig,
    routing: Mapping[int, Tensor],
    lengths: Tensor,
    prompt_lens: Tensor,
    *,
    prompt_logits: Literal["last", "all"] = "last",
    starts: Tensor | None = None,
    kept_before: Mapping[int, Tensor] | None = None,
) -> FlopReport:
    """Count a batch from the routing decisions actually taken.

    `routing[layer]`: `[B, T]` bool for every gated layer (True = full path), covering each
    sequence's tokens `0 .. lengths[b]-1` (prompt then fed-back completion tokens; columns
    past `lengths[b]` are ignored). `prompt_lens[b]` of those tokens are the prompt.

    Or a window of each sequence: column j of row b is position `starts[b] + j` (default 0),
    `lengths[b]` counts the row's columns and `kept_before[layer]` (`[B]`, default 0) the
    gated layer's kept entries at earlier positions, so that consecutive windows add up to the
    whole count. Phase and LM-head tokens go by position (`prompt_lens`: the whole prompts).
    """
    d, hd, heads, kv_heads = (
        config.hidden_size,
        config.head_dim,
        config.num_attention_heads,
        config.num_key_value_heads,
    )
    spec = config.routing
    lengths = torch.as_tensor(lengths, dtype=torch.long).cpu()
    prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long).cpu()
    batch = lengths.numel()
    width = int(lengths.max()) if batch else 0
    starts = torch.as_tensor(0 if starts is None else starts, dtype=torch.long).cpu().expand(batch)
    steps = torch.arange(width)
    valid = steps[None, :] < lengths[:, None]
    positions = starts[:, None] + steps[None, :]
    in_prompt = (positions < prompt_lens[:, None]) & valid
    in_completion = valid & ~in_prompt
    zero = torch.zeros(batch, width, dtype=torch.long)

    projections = 2 * d * (heads + 2 * kv_heads) * hd + 2 * heads * hd * d
    mlp = 3 * 2 * d * config.intermediate_size
    linear_projections = 4 * 2 * d * heads * hd + 2 * heads * hd * d + 2 * 2 * d * heads
    recurrent = 6 * hd * hd * heads
    chunked = (6 * hd * hd + 6 * CHUNK_SIZE * hd + 2 * (CHUNK_SIZE - 1) * hd) * heads
    attention_per_entry = 2 * 2 * heads * hd
    surprise = 2 * 2 * d

    def full_path(mask: Tensor, before: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """FLOPs per token of a full-path mask (`before` `[B]` entries kept earlier), its
        attention part, and the mask as int."""
        kept = mask.long()
        attention = (before[:, None] + kept.cumsum(dim=1)) * kept * attention_per_entry
        return kept * (projections + mlp) + attention, attention, kept

    def earlier(layer: int) -> Tensor:
        before = 0 if kept_before is None else kept_before.get(layer, 0)
        return torch.as_tensor(before, dtype=torch.long).cpu().expand(batch)

    dense_layer, dense_attention, dense_kept = full_path(valid, starts)
    executed = zero.clone()
    kv_executed = zero.clone()
    gated_attention = zero.clone()
    gated_attention_dense = zero.clone()
    linear_layer = valid.long() * (linear_projections + mlp)
    linear_layer += in_prompt.long() * chunked + in_completion.long() * recurrent
    for layer in range(config.num_hidden_layers):
        if layer in config.linear_layers:
            executed += linear_layer
            continue
        if layer in spec.gated_layers:
            if layer not in routing:
                raise KeyError(f"no routing decisions for gated layer {layer}")
            mask = routing[layer].cpu()[:, :width].bool() & valid
            per_token, attention, kept = full_path(mask, earlier(layer))
        else:
            per_token, attention, kept = dense_layer, dense_attention, dense_kept
        if layer in spec.gated_layers:
            gated_attention += attention
            gated_attention_dense += dense_attention
        if spec.kind == "sdt" and layer in spec.decision_layers and spec.score == "gate":
            per_token = per_token + valid.long() * (3 * 2 * d * spec.prior_width + surprise)
        if layer in spec.gated_layers:
            skipped = valid.long() - kept
            if spec.kind == "sdt":
                router = 2 * d if spec.score == "router" else 0
                per_token = per_token + valid.long() * router
                per_token = per_token + skipped * (3 * 2 * d * spec.prior_width)
            else:
                per_token = per_token + valid.long() * (2 * 2 * d)
                per_token = per_token + skipped * (3 * 2 * d * spec.transition_width)
        executed += per_token
        kv_executed += kept

    dense = dense_layer * config.num_hidden_layers
    kv_dense = dense_kept * config.num_hidden_layers

    head = 2 * d * config.vocab_size
    if prompt_logits == "all":
        head_tokens = valid.long()
    else:
        last_prompt = (positions == (prompt_lens[:, None] - 1)) & valid
        head_tokens = (last_prompt | in_completion).long()
    executed += head_tokens * head
    dense += head_tokens * head

    def phase(mask: Tensor) -> PhaseCounts:
        m = mask.long()
        return PhaseCounts(
            flops=(executed * m).sum(dim=1),
            dense_flops=(dense * m).sum(dim=1),
            kv_entries=(kv_executed * m).sum(dim=1),
            kv_entries_dense=(kv_dense * m).sum(dim=1),
            gated_attention_flops=(gated_attention * m).sum(dim=1),
            gated_attention_flops_dense=(gated_attention_dense * m).sum(dim=1),
        )

    return FlopReport(prompt=phase(in_prompt), completion=phase(in_completion))


def state_elements(config: ModelConfig) -> int:
    """Recurrent-state elements one sequence holds (hybrids' linear layers), however long it is:
    `H · hd · hd` per linear layer, where a softmax layer holds `2 · H_kv · hd` per KV entry."""
    hd = config.head_dim
    return len(config.linear_layers) * config.num_attention_heads * hd * hd


def sequence_memory_bytes(
    config: ModelConfig, tokens: int, kv_bytes: int = 2, state_bytes: int = 4
) -> int:
    """What one sequence of `tokens` tokens holds: KV entries of the softmax layers
    (`2 · H_kv · hd` elements per token and layer, `kv_bytes` each) plus the linear layers'
    constant recurrent state (`state_elements`, `state_bytes` each: fp32, as it accumulates)."""
    softmax = config.num_hidden_layers - len(config.linear_layers)
    kv = softmax * tokens * 2 * config.num_key_value_heads * config.head_dim
    return kv * kv_bytes + state_elements(config) * state_bytes
