"""Subjective Timescale Transformer: every other layer is temporal.

A temporal layer predicts each token's residual update from the previous token's input to the
same layer, `Δx̂_t = Transition(RMSNorm(x_{t-1}))` (zero at t = 0, since the SwiGLU has no bias
and `x_{-1} = 0`). Training: a dense pass measures Δx for every token and the surprise gate
(`D_st = ||Δx||²/d`, `D_ch = ||Δx - Δx̂||²/d`); the top `ceil(γ·T)` by g (plus the sink tokens)
rerun the block among themselves, their update passed through `g / stopgrad(g)` (1 in value).
Inference: a causal router on `[x_t, x_{t-1}]` decides; selected tokens become `x + Block(x)`
(unscaled: keeping every token is the dense model) and add K/V to the layer's cache; the rest
take the transition's prediction `x + Δx̂` (the skip path's prior): no attention, no MLP, no KV.
"""

from __future__ import annotations

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
from subjective.model_registry.sdt import (
    gated_step,
    init_fresh,
    predicted_update,
    scatter,
)
from subjective.model_registry.surprise import (
    SurpriseGate,
    causal_moving_average,
    mean_squared_norm,
)


def previous_tokens(x: Tensor) -> Tensor:
    """`x_{t-1}` of `[B, T, d]` (zero at t = 0), within each row."""
    prev = torch.zeros_like(x)
    prev[:, 1:] = x[:, :-1]
    return prev


class TemporalLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        routing = config.routing
        if routing.score != "router":
            raise ValueError("STT routes by its causal router: g needs the block to be run")
        self.capacity = routing.capacity
        self.sink_tokens = routing.sink_tokens
        self.ma_window = routing.ma_window
        self.transition_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.transition = SwiGLU(config.hidden_size, routing.transition_width)
        self.surprise = SurpriseGate(
            routing.o_ce_init, routing.m_cu_init, routing.beta_ce, routing.beta_cu
        )
        # One norm for both halves: x_{t-1} = 0 at t = 0 stays 0.
        self.router_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.router = nn.Linear(2 * config.hidden_size, 1)
        init_fresh(self.transition)

    def previous_inputs(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        """`x_{t-1}` for every token: shifted inputs, the cached last input at a chunk start."""
        prev = previous_tokens(h)
        if ctx.cache is not None:
            state = ctx.cache.gate_state(self.index)
            for b, last in enumerate(state.prev_input):
                if last is not None:
                    prev[b, 0] = last
        return prev

    def remember_last_inputs(self, h: Tensor, ctx: ForwardContext) -> None:
        if ctx.cache is None:
            return
        state = ctx.cache.gate_state(self.index)
        for b, count in enumerate(counts_of(ctx.valid)):
            if count:
                state.prev_input[b] = h[b, count - 1].detach().clone()

    def surprise_gate(
        self, delta: Tensor, prev: Tensor, counts: list[int]
    ) -> tuple[Tensor, Tensor]:
        """g for packed tokens with actual update `delta`; also returns the predicted update."""
        predicted = predicted_update(self.transition, self.transition_norm, prev)
        d_st = mean_squared_norm(delta)
        d_ch = mean_squared_norm(delta - predicted)
        average = causal_moving_average(d_st, counts, self.ma_window)
        return self.surprise(d_st, d_ch, average), predicted

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        valid = ctx.valid
        prev = self.previous_inputs(h, ctx)
        pair = torch.cat([h, prev], dim=-1)[valid].detach()
        router_in = torch.cat([self.router_norm(half) for half in pair.chunk(2, dim=-1)], -1)
        logits = scatter(self.router(router_in).squeeze(-1), valid, float("-inf"))
        gate = None
        if ctx.topk:
            # Dense measuring pass (training only): every token's Δx and g, no KV written.
            x = h[valid]
            attn, mlp = self.block(x, ctx.positions[valid], counts_of(valid), None)
            delta = attn + mlp
            g, predicted = self.surprise_gate(delta, prev[valid], counts_of(valid))
            gate = scatter(g, valid)
            if torch.is_grad_enabled():
                ctx.add_aux("transition_mse", F.mse_loss(predicted, delta.detach()))
                ctx.add_aux("gate_mean", g.mean())
        out, _, _ = gated_step(
            self,
            h,
            ctx,
            gate,
            logits,
            lambda skipped: predicted_update(self.transition, self.transition_norm, prev[skipped]),
        )
        self.remember_last_inputs(h, ctx)
        return out


class SubjectiveTimescaleForCausalLM(LlamaForCausalLM):
    architecture = "SubjectiveTimescaleForCausalLM"

    def make_layer(self, index: int) -> nn.Module:
        if index in self.config.routing.gated_layers:
            return TemporalLayer(self.config, index)
        return LlamaDecoderLayer(self.config, index)
