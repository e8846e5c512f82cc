"""The gated layers' steps on vLLM's Llama modules, for the tokens of one `StepBatch`.

Each function takes a `vllm...llama.LlamaDecoderLayer` (with the routing adapter's modules
attached, named as in the reference so the adapter loads by name) and returns the layer's
output for all tokens. The math is the reference's (`sdt.py`, `stt.py`): the same gate,
moving average, threshold comparison and sink tokens, kept tokens unscaled, skipped tokens on
their layer's prior.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from subjective.model_registry.surprise import (
    causal_moving_average,
    mean_squared_norm,
    threshold_mask,
)
from subjective.model_registry.vllm_plugin.batch import StepBatch
from subjective.model_registry.vllm_plugin.compact_attention import compact_attention
from subjective.model_registry.vllm_plugin.kv_spec import CompactedAttention, within_capacity


def dense(layer: nn.Module, h: Tensor, positions: Tensor) -> Tensor:
    """`H + Block(H)` for every token, through vLLM's own attention (full KV)."""
    attn = layer.self_attn(positions=positions, hidden_states=layer.input_layernorm(h))
    mid = h + attn
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def per_row(batch: StepBatch, selected: Tensor) -> Tensor:
    """Selected tokens per row, `[rows]` long."""
    return torch.bincount(batch.row_of_token[selected], minlength=len(batch.states)).cpu()


def kept_before(batch: StepBatch, index: int) -> list[int]:
    return [s.kept.get(index, 0) for s in batch.states]


def gated_block(
    layer: nn.Module, index: int, x: Tensor, positions: Tensor, batch: StepBatch, new: Tensor
) -> tuple[Tensor, Tensor]:
    """`Block(x) = (attn, mlp)` of the selected tokens; K/V appended compacted to the layer."""
    if x.shape[0] == 0:
        # No token of the step runs the block. vLLM's linear layers must not see zero rows: in
        # bf16/fp16 on AMX CPUs they run sgl-kernel's `weight_packed_linear`, which dies of SIGFPE.
        nothing = x.new_zeros(0, x.shape[-1])
        return nothing, nothing
    sa = layer.self_attn
    qkv, _ = sa.qkv_proj(layer.input_layernorm(x))
    q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
    q, k = sa.rotary_emb(positions, q, k)
    before = torch.tensor(kept_before(batch, index), dtype=torch.long)
    out = compact_attention(sa.attn, q, k, v, batch.block_table, before, new)
    for state, total in zip(batch.states, (before + new).tolist(), strict=True):
        state.kept[index] = total
    attn, _ = sa.o_proj(out)
    return attn, layer.mlp(layer.post_attention_layernorm(x + attn))


def select(
    layer: nn.Module, index: int, logits: Tensor, positions: Tensor, batch: StepBatch
) -> Tensor:
    """Router probability above each token's request threshold (the reference's comparison),
    plus the sink positions, then the layer's KV capacity cap when its pages are compacted
    (the sinks always fit: the first block holds at least `KERNEL_BLOCK_MULTIPLE` entries)."""
    ones = torch.ones_like(logits, dtype=torch.bool)[:, None]
    selected = threshold_mask(logits[:, None], ones, batch.thresholds)[:, 0]
    selected |= positions < layer.sink_tokens
    attn = layer.self_attn.attn
    if not isinstance(attn, CompactedAttention):
        return selected
    before = kept_before(batch, index)
    return within_capacity(
        selected, positions, batch.counts, before, attn.page_entries, attn.block_size
    )


def decision(
    layer: nn.Module,
    index: int,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch | None,
    score: str,
) -> tuple[Tensor, Tensor | None]:
    """SDT Decision layer: the dense output, and the surprise gate g of the real tokens when the
    Dynamic layer routes by g (`score="gate"`; with a router, g is not needed at inference)."""
    post = dense(layer, h, positions)
    if batch is None or score != "gate":
        return post, None
    n = batch.num_tokens
    x, p = h[:n], post[:n]
    prior = x + layer.prior(layer.prior_norm(x))
    d_st, d_ch = mean_squared_norm(p - x), mean_squared_norm(p - prior)
    state = batch.gate_state(index)
    average = causal_moving_average(d_st, batch.counts, layer.ma_window, state)
    batch.keep_gate_state(index, state)
    return post, layer.surprise(d_st, d_ch, average)


def route(
    layer: nn.Module,
    index: int,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch,
    logits: Tensor,
    skip_update: Callable[[Tensor], Tensor],
) -> Tensor:
    """The gated step both kinds share: kept tokens become `x + Block(x)` (unscaled, compacted
    K/V written), the others `x + skip_update(skipped mask)`: no attention, no MLP, no KV."""
    n = batch.num_tokens
    x = h[:n]
    selected = select(layer, index, logits, positions[:n], batch)
    xs = x[selected]
    attn, mlp = gated_block(
        layer, index, xs, positions[:n][selected], batch, per_row(batch, selected)
    )
    out = h.clone()
    out[:n][selected] = (xs + attn) + mlp
    skipped = ~selected
    out[:n][skipped] = x[skipped] + skip_update(skipped)
    batch.record(index, selected)
    return out


def dynamic(
    layer: nn.Module,
    index: int,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch | None,
    gate: Tensor | None,
) -> Tensor:
    """SDT Dynamic layer: the router (or g) picks who runs the block; the rest take the prior."""
    if batch is None:
        return h  # profiling / dummy run: no request, nothing routed
    x = h[: batch.num_tokens]
    if gate is not None:
        logits = torch.logit(gate.float().clamp(0.0, 1.0))
    else:
        logits = layer.router(layer.router_norm(x)).squeeze(-1)
    return route(
        layer,
        index,
        h,
        positions,
        batch,
        logits,
        lambda skipped: layer.prior(layer.prior_norm(x[skipped])),
    )


def previous_inputs(x: Tensor, batch: StepBatch, last: list[Tensor | None]) -> Tensor:
    """`x_{t-1}` per token: shifted within each row, the row's remembered input at its start."""
    prev = torch.zeros_like(x)
    start = 0
    for count, remembered in zip(batch.counts, last, strict=True):
        prev[start + 1 : start + count] = x[start : start + count - 1]
        if remembered is not None:
            prev[start] = remembered
        start += count
    return prev


def temporal(
    layer: nn.Module, index: int, h: Tensor, positions: Tensor, batch: StepBatch | None
) -> Tensor:
    """STT temporal layer: the causal router on `[x_t, x_{t-1}]` picks who runs the block; the
    rest take the transition network's predicted update from `x_{t-1}`."""
    if batch is None:
        return h
    x = h[: batch.num_tokens]
    state = batch.gate_state(index)
    prev = previous_inputs(x, batch, state.prev_input)
    router_in = torch.cat([layer.router_norm(x), layer.router_norm(prev)], dim=-1)
    out = route(
        layer,
        index,
        h,
        positions,
        batch,
        layer.router(router_in).squeeze(-1),
        lambda skipped: layer.transition(layer.transition_norm(prev[skipped])),
    )
    ends = torch.cumsum(torch.tensor(batch.counts), 0) - 1
    state.prev_input = [x[int(end)].detach().clone() for end in ends]
    batch.keep_gate_state(index, state)
    return out
