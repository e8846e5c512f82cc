"""The gated layers' steps on vLLM's Llama modules, for the tokens of one `StepBatch`.

Each function takes a `vllm...llama.LlamaDecoderLayer` (with the routing adapter's modules
attached, named as in the reference so the adapter loads by name, and the norm-folded copies
that inference runs, `folded.py`) and returns the layer's output for all tokens. The math is
the reference's (`sdt.py`, `stt.py`): the same gate, moving average, threshold comparison and
sink tokens, kept tokens unscaled, skipped tokens on their layer's prior.

Cost follows the kept tokens: the block runs on the kept tokens only, the prior on the skipped
ones only; a layer where every token is kept (or none) does no gathering, and one where none is
kept runs no block at all. The layer's one host read is its kept count (it sizes the block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from subjective.model_registry.surprise import mean_squared_norm
from subjective.model_registry.vllm_plugin.batch import StepBatch
from subjective.model_registry.vllm_plugin.compact_attention import compact_attention
from subjective.model_registry.vllm_plugin.folded import FoldedSwiGLU, rms_scale
from subjective.model_registry.vllm_plugin.kv_spec import CompactedAttention, within_capacity


def dense(layer: nn.Module, h: Tensor, positions: Tensor) -> Tensor:
    """`H + Block(H)` for every token, through vLLM's own attention (full KV)."""
    attn = layer.self_attn(positions=positions, hidden_states=layer.input_layernorm(h))
    mid = h + attn
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def block_in(layer: nn.Module, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of the block's attention (norm, fused QKV projection, rotary)."""
    sa = layer.self_attn
    qkv, _ = sa.qkv_proj(layer.input_layernorm(x))
    q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
    q, k = sa.rotary_emb(positions, q, k)
    return q, k, v


def block_out(layer: nn.Module, x: Tensor, attended: Tensor) -> Tensor:
    """`(x + o_proj(attended)) + mlp`: the rest of the block after its attention."""
    attn, _ = layer.self_attn.o_proj(attended)
    mid = x + attn
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


@dataclass(frozen=True)
class Steps:
    """The layers' shape-generic pieces (no routing, no host reads): plain, or compiled once
    each by `torch.compile` (dynamic token count) when vLLM runs in compiled mode. Routing,
    the kept tokens' gathers and the compacted attention between them stay eager."""

    dense: Callable[[nn.Module, Tensor, Tensor], Tensor] = dense
    block_in: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] = block_in
    block_out: Callable[[nn.Module, Tensor, Tensor], Tensor] = block_out

    @classmethod
    def compiled(cls) -> Steps:
        return cls(*(torch.compile(step, dynamic=True) for step in (dense, block_in, block_out)))


def gated_block(
    layer: nn.Module,
    g: int,
    x: Tensor,
    positions: Tensor,
    batch: StepBatch,
    rows: Tensor,
    steps: Steps,
) -> Tensor:
    """`(x + attn) + mlp` of the kept tokens `x` (rows `rows`); their K/V appended compacted."""
    q, k, v = steps.block_in(layer, x, positions)
    before = batch.kept[:, g]
    new = torch.zeros_like(before).index_add_(0, rows, torch.ones_like(rows))
    out = compact_attention(
        layer.self_attn.attn, q, k, v, batch.block_table, before, new, rows, batch.max_query_len
    )
    batch.kept[:, g] = before + new
    return steps.block_out(layer, x, out)


def select(layer: nn.Module, g: int, logits: Tensor, positions: Tensor, batch: StepBatch) -> Tensor:
    """Router logit above each token's request cut (`logit(threshold)`, the reference's strict
    comparison), plus the sink positions, then the layer's KV capacity cap when its pages are
    compacted (the sinks always fit: the first block holds at least `KERNEL_BLOCK_MULTIPLE`
    entries)."""
    selected = (logits.float() > batch.cuts) | (positions < layer.sink_tokens)
    attn = layer.self_attn.attn
    if not isinstance(attn, CompactedAttention):
        return selected
    return within_capacity(
        selected, positions, batch.counts, batch.kept[:, g], attn.page_entries, attn.block_size
    )


def moving_average(d_st: Tensor, batch: StepBatch, slot: int, window: int) -> Tensor:
    """`surprise.causal_moving_average` of every row at once, with the rows' histories.

    Each row's series is its history (right-aligned in `window` columns) then its new values;
    the same float64 prefix sums as the reference, over zeros where a row has nothing, so the
    averages are the reference's to the bit. Updates the batch's history of gate layer `slot`.
    """
    values = batch.padded(d_st.detach())  # [rows, width]
    have = batch.history_len[:, slot]
    series = torch.cat([batch.history[:, slot], values], dim=1).double()
    prefix = torch.nn.functional.pad(series.cumsum(1), (1, 0))
    columns = window + batch.column_of_token
    rows = batch.row_of_token
    lo = torch.maximum(columns - window, window - have[rows])
    total = prefix[rows, columns] - prefix[rows, lo]
    n_before = (columns - lo).to(series.dtype)
    own = series[rows, columns]
    average = torch.where(n_before > 0, total / n_before.clamp_min(1), own).to(d_st.dtype)
    tail = batch.counts[:, None] + torch.arange(window, device=d_st.device)[None, :]
    batch.history[:, slot] = series.gather(1, tail).to(batch.history.dtype)
    batch.history_len[:, slot] = (have + batch.counts).clamp(max=window)
    return average


def decision(
    layer: nn.Module,
    slot: int | None,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch | None,
    steps: Steps,
) -> tuple[Tensor, Tensor | None]:
    """SDT Decision layer: the dense output, and the surprise gate g of the real tokens when the
    Dynamic layer routes by g (`slot`: its place among those layers; None with a router, where
    g is not needed at inference)."""
    post = steps.dense(layer, h, positions)
    if batch is None or slot is None:
        return post, None
    n = batch.num_tokens
    x, p = h[:n], post[:n]
    prior = x + layer.prior(layer.prior_norm(x))
    d_st, d_ch = mean_squared_norm(p - x), mean_squared_norm(p - prior)
    average = moving_average(d_st, batch, slot, layer.ma_window)
    return post, layer.surprise(d_st, d_ch, average)


def route(
    layer: nn.Module,
    g: int,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch,
    logits: Tensor,
    prior_input: Tensor,
    prior_scale: Tensor,
    prior: FoldedSwiGLU,
    steps: Steps,
) -> Tensor:
    """The gated step both kinds share: kept tokens become `x + Block(x)` (unscaled, compacted
    K/V written), the others `x + prior(prior_input)` (`prior_scale`: its RMS scale): no
    attention, no MLP, no KV."""
    n = batch.num_tokens
    x, pos = h[:n], positions[:n]
    selected = select(layer, g, logits, pos, batch)
    batch.decisions[g] = selected
    kept = int(selected.sum())
    if kept == n:
        out = gated_block(layer, g, x, pos, batch, batch.row_of_token, steps)
    elif kept == 0:
        # Never call vLLM's layers on zero rows: in bf16/fp16 on AMX CPUs its linear layers run
        # sgl-kernel's `weight_packed_linear`, which dies of SIGFPE on an empty batch.
        out = x + prior(prior_input, prior_scale)
    else:
        keep, skip = selected.nonzero().squeeze(1), (~selected).nonzero().squeeze(1)
        out = torch.empty_like(x)
        rows = batch.row_of_token[keep]
        out[keep] = gated_block(layer, g, x[keep], pos[keep], batch, rows, steps)
        out[skip] = x[skip] + prior(prior_input[skip], prior_scale[skip])
    return out if n == h.shape[0] else torch.cat([out, h[n:]])


def dynamic(
    layer: nn.Module,
    g: int,
    h: Tensor,
    positions: Tensor,
    batch: StepBatch | None,
    gate: Tensor | None,
    steps: Steps,
) -> Tensor:
    """SDT Dynamic layer: the router (or g) picks who runs the block; the rest take the prior."""
    if batch is None:
        return h  # profiling / dummy run: no request, nothing routed
    x = h[: batch.num_tokens]
    scale = rms_scale(x, layer.folded_router.eps)
    if gate is not None:
        logits = torch.logit(gate.float().clamp(0.0, 1.0))
    else:
        logits = layer.folded_router(x, scale)
    return route(layer, g, h, positions, batch, logits, x, scale, layer.folded_prior, steps)


def previous_inputs(x: Tensor, batch: StepBatch, g: int) -> Tensor:
    """`x_{t-1}` per token: shifted within each row, the row's remembered input at its start."""
    prev = torch.empty_like(x)
    prev[1:] = x[:-1]
    prev[batch.first_token] = batch.prev_input[:, g].to(x.dtype)
    return prev


def temporal(
    layer: nn.Module, g: int, h: Tensor, positions: Tensor, batch: StepBatch | None, steps: Steps
) -> Tensor:
    """STT temporal layer: the causal router on `[x_t, x_{t-1}]` picks who runs the block; the
    rest take the transition network's predicted update from `x_{t-1}`."""
    if batch is None:
        return h
    x = h[: batch.num_tokens]
    prev = previous_inputs(x, batch, g)
    eps = layer.folded_router_x.eps
    scale, prev_scale = rms_scale(x, eps), rms_scale(prev, eps)
    logits = layer.folded_router_x(x, scale) + layer.folded_router_prev(prev, prev_scale)
    out = route(
        layer, g, h, positions, batch, logits, prev, prev_scale, layer.folded_transition, steps
    )
    batch.prev_input[:, g] = x[batch.last_token].detach()
    return out
