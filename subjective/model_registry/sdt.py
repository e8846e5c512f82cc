"""Subjective Depth Transformer: Decision layers gate the Dynamic layer that follows them.

Decision layer (dense): `H_post = H + Block(H)` for every token; in training (and when the
Dynamic layer routes by `score="gate"`) also a narrow prior `H_prior = H + PriorFFN(RMSNorm(H))`
and the surprise gate g. Dynamic layer: the selected tokens (Top-K by g in training, causal
router above the threshold at inference, plus the sink tokens) become `H + Block(H)`, unscaled,
so a model that keeps every token is exactly the dense model (training passes the gradient to g
by a straight-through factor `g / stopgrad(g)`). The others take the layer's own prior,
`H + Prior(RMSNorm(H))`: no attention, no MLP, no KV entry, invisible to later queries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subjective.model_registry.config import ModelConfig
from subjective.model_registry.llama import (
    ForwardContext,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    SwiGLU,
    counts_of,
)
from subjective.model_registry.surprise import (
    SurpriseGate,
    causal_moving_average,
    mean_squared_norm,
    threshold_mask,
    topk_mask,
)


def init_fresh(module: nn.Module) -> None:
    """Fresh prior/transition weights: small normal linears, zero biases.

    Routers keep PyTorch's default (unit-scale) init, so their scores differ across tokens
    from the start; the priors start small, i.e. close to "no change" (`H_prior ≈ H`).
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def select_tokens(
    layer: int,
    ctx: ForwardContext,
    gate: Tensor | None,
    router_logits: Tensor,
    capacity: float,
    sink_tokens: int,
) -> Tensor:
    """The `[B, T]` full-path mask of a gated layer: forced, or the sink tokens plus Top-K by g
    (training) or router above the threshold (inference)."""
    if ctx.forced_routing is not None and layer in ctx.forced_routing:
        return ctx.forced_routing[layer].to(ctx.valid.device) & ctx.valid
    if ctx.topk:
        if gate is None:
            raise RuntimeError(f"layer {layer}: Top-K routing needs the gate g")
        chosen = topk_mask(gate, ctx.valid, capacity)
    else:
        chosen = threshold_mask(router_logits, ctx.valid, ctx.threshold)
    return chosen | ((ctx.positions < sink_tokens) & ctx.valid)


def kept_update(x: Tensor, attn: Tensor, mlp: Tensor, gate: Tensor | None) -> Tensor:
    """`x + Block(x)` of kept tokens, added in HF's order; with `gate` (training) the update is
    multiplied by `g / stopgrad(g)`: 1 in value, so the gradient reaches g through it."""
    if gate is None:
        return (x + attn) + mlp
    factor = (gate / gate.detach()).unsqueeze(-1).to(x.dtype)
    return x + factor * attn + factor * mlp


def predicted_update(prior: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """The skip path's predicted update of tokens `x` (`Prior(RMSNorm(x))`)."""
    return prior(norm(x))


def gated_step(
    layer: LlamaDecoderLayer,
    h: Tensor,
    ctx: ForwardContext,
    gate: Tensor | None,
    logits: Tensor,
    skip_update: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """The step SDT's Dynamic and STT's temporal layers share: choose the full-path tokens (the
    router learns the Top-K choice in training), run the block on them (their K/V kept), give
    the others `x + skip_update(skipped mask)`. Returns the output, the kept mask and the kept
    tokens' update `Block(x)`."""
    valid = ctx.valid
    selected = select_tokens(layer.index, ctx, gate, logits, layer.capacity, layer.sink_tokens)
    if ctx.topk and torch.is_grad_enabled():
        target = selected[valid].to(logits.dtype)
        ctx.add_aux("router_bce", F.binary_cross_entropy_with_logits(logits[valid], target))
    x = h[selected]
    attn, mlp = layer.block(x, ctx.positions[selected], counts_of(selected), ctx.kv(layer.index))
    out = h.clone()
    out[selected] = kept_update(x, attn, mlp, gate[selected] if ctx.topk else None)
    skipped = valid & ~selected
    out[skipped] = h[skipped] + skip_update(skipped)
    ctx.routing[layer.index] = selected
    if gate is not None:
        ctx.gates[layer.index] = gate
    return out, selected, attn + mlp


def scatter(values: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """Packed per-token values back to `[B, T]`, `fill` where `mask` is False."""
    out = values.new_full(mask.shape, fill)
    out[mask] = values
    return out


class DecisionLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        routing = config.routing
        self.ma_window = routing.ma_window
        self.score = routing.score
        self.prior_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prior = SwiGLU(config.hidden_size, routing.prior_width)
        self.surprise = SurpriseGate(
            routing.o_ce_init, routing.m_cu_init, routing.beta_ce, routing.beta_cu
        )
        init_fresh(self.prior)

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        valid = ctx.valid
        x = h[valid]
        post = self.run_dense(h, ctx, ctx.kv(self.index))
        out = h.clone()
        out[valid] = post
        if not (ctx.topk or self.score == "gate"):
            return out  # routing by the Dynamic layer's router: g is not needed
        prior = x + self.prior(self.prior_norm(x))
        d_st = mean_squared_norm(post - x)
        d_ch = mean_squared_norm(post - prior)
        state = None if ctx.cache is None else ctx.cache.gate_state(self.index)
        average = causal_moving_average(d_st, counts_of(valid), self.ma_window, state)
        ctx.pending_gate = scatter(self.surprise(d_st, d_ch, average), valid)
        if torch.is_grad_enabled():
            ctx.add_aux("prior_mse", F.mse_loss(prior, post.detach()))
        return out


class DynamicLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        routing = config.routing
        self.capacity = routing.capacity
        self.score = routing.score
        self.sink_tokens = routing.sink_tokens
        # Normalised input: residual streams of pretrained models carry huge outlier features.
        self.router_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = nn.Linear(config.hidden_size, 1)
        self.prior_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prior = SwiGLU(config.hidden_size, routing.prior_width)
        init_fresh(self.prior)

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        gate = ctx.pending_gate
        ctx.pending_gate = None
        if gate is None and (ctx.topk or self.score == "gate"):
            raise RuntimeError(f"Dynamic layer {self.index} needs its Decision layer's g")
        valid = ctx.valid
        if self.score == "gate" and not ctx.topk:
            # g is a probability already: compared with the threshold as the router would be.
            logits = torch.logit(gate.detach().float().clamp(0.0, 1.0))
        else:
            state = self.router_norm(h[valid].detach())
            logits = scatter(self.router(state).squeeze(-1), valid, float("-inf"))
        out, selected, update = gated_step(
            self, h, ctx, gate, logits, lambda skipped: self.predict(h[skipped])
        )
        if ctx.topk and torch.is_grad_enabled():
            ctx.add_aux("prior_mse", F.mse_loss(self.predict(h[selected]), update.detach()))
        return out

    def predict(self, x: Tensor) -> Tensor:
        return predicted_update(self.prior, self.prior_norm, x)


class SubjectiveDepthForCausalLM(LlamaForCausalLM):
    architecture = "SubjectiveDepthForCausalLM"

    def make_layer(self, index: int) -> nn.Module:
        routing = self.config.routing
        if index in routing.decision_layers:
            return DecisionLayer(self.config, index)
        if index in routing.gated_layers:
            if index - 1 not in routing.decision_layers:
                raise ValueError(f"Dynamic layer {index} must follow a Decision layer")
            return DynamicLayer(self.config, index)
        return LlamaDecoderLayer(self.config, index)
