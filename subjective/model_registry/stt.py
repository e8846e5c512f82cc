"""Subjective Timescale Transformer: every other layer is temporal.

A temporal layer predicts each token's residual update from the previous token's input to the
same layer, `Δx̂_t = Transition(RMSNorm(x_{t-1}))` (zero at t = 0, since the SwiGLU has no bias
and `x_{-1} = 0`), and gates on the surprise `D_st = ||Δx||²/d`, `D_ch = ||Δx - Δx̂||²/d`.
Training: a dense pass measures Δx for every token, the top `ceil(γ·T)` by g then rerun the
block among themselves as `x + g·Block(x)`. Inference: a causal router on `[x_t, x_{t-1}]`
decides; only selected tokens run the block (the gate g comes from their own Δx, with the
moving average over earlier *executed* tokens), add K/V to the layer's cache, and the rest
keep `x`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subjective.model_registry.cache import GateState
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.llama import (
    ForwardContext,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    RMSNorm,
    SwiGLU,
    counts_of,
)
from subjective.model_registry.sdt import init_fresh, scatter, select_tokens
from subjective.model_registry.surprise import (
    SurpriseGate,
    causal_moving_average,
    mean_squared_norm,
)


class TemporalLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__(config, index)
        routing = config.routing
        if routing.score != "router":
            raise ValueError("STT routes by its causal router: g needs the block to be run")
        self.capacity = routing.capacity
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
        prev = torch.zeros_like(h)
        prev[:, 1:] = h[:, :-1]
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
        self, delta: Tensor, prev: Tensor, counts: list[int], state: GateState | None
    ) -> tuple[Tensor, Tensor]:
        """g for packed tokens with actual update `delta`; also returns the predicted update."""
        predicted = self.transition(self.transition_norm(prev))
        d_st = mean_squared_norm(delta)
        d_ch = mean_squared_norm(delta - predicted)
        average = causal_moving_average(d_st, counts, self.ma_window, state)
        return self.surprise(d_st, d_ch, average), predicted

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        valid = ctx.valid
        prev = self.previous_inputs(h, ctx)
        state = None if ctx.cache is None else ctx.cache.gate_state(self.index)
        pair = torch.cat([h, prev], dim=-1)[valid].detach()
        router_in = torch.cat([self.router_norm(half) for half in pair.chunk(2, dim=-1)], -1)
        logits = scatter(self.router(router_in).squeeze(-1), valid, float("-inf"))
        out = h.clone()
        if ctx.topk:
            # Dense measuring pass (training only): every token's Δx, no KV written.
            x = h[valid]
            attn, mlp = self.block(x, ctx.positions[valid], counts_of(valid), None)
            delta = attn + mlp
            g, predicted = self.surprise_gate(delta, prev[valid], counts_of(valid), state)
            gate = scatter(g, valid)
            selected = select_tokens(self.index, ctx, gate, logits, self.capacity)
            if torch.is_grad_enabled():
                target = selected[valid].to(logits.dtype)
                ctx.add_aux("transition_mse", F.mse_loss(predicted, delta.detach()))
                ctx.add_aux("router_bce", F.binary_cross_entropy_with_logits(logits[valid], target))
                ctx.add_aux("gate_mean", g.mean())
            xs = h[selected]
            attn, mlp = self.block(
                xs, ctx.positions[selected], counts_of(selected), ctx.kv(self.index)
            )
            out[selected] = xs + gate[selected].unsqueeze(-1) * (attn + mlp)
        else:
            selected = select_tokens(self.index, ctx, logits, logits, self.capacity)
            xs = h[selected]
            counts = counts_of(selected)
            attn, mlp = self.block(xs, ctx.positions[selected], counts, ctx.kv(self.index))
            delta = attn + mlp
            g, _ = self.surprise_gate(delta, prev[selected], counts, state)
            gate = scatter(g, selected)
            out[selected] = xs + g.unsqueeze(-1) * delta
        self.remember_last_inputs(h, ctx)
        ctx.routing[self.index] = selected
        ctx.gates[self.index] = gate
        return out


class SubjectiveTimescaleForCausalLM(LlamaForCausalLM):
    architecture = "SubjectiveTimescaleForCausalLM"

    def make_layer(self, index: int) -> nn.Module:
        if index in self.config.routing.gated_layers:
            return TemporalLayer(self.config, index)
        return LlamaDecoderLayer(self.config, index)
