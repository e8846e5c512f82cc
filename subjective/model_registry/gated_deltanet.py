"""Gated DeltaNet attention for hybrid models, initialised from a softmax attention layer.

The layer of fla's `GatedDeltaNet` as the hybrid-distillation authors configure their student
(output gate on, no short convolution, one head per teacher query head, `expand_v = 1`, no
RoPE): per token `x`,

    q, k, v = silu(q_proj x), silu(k_proj x), silu(v_proj x)    (per head; q, k L2-normalised)
    g    = −exp(A_log) · softplus(a_proj x + dt_bias)           (log-decay per head, ≤ 0)
    beta = sigmoid(b_proj x)                                    (write strength per head)
    o    = gated delta rule (`delta_rule.py`, scale 1/√head_dim)
    out  = o_proj(RMSNorm(o) · o_norm.weight · silu(g_proj x))  (gated RMSNorm per head)

Parameter names (under `model.layers.N.self_attn.`, as the softmax layers'), for loading by
name: `q_proj.weight` `[H·hd, d]`, `k_proj.weight` `[H·hd, d]`, `v_proj.weight` `[H·hd, d]`,
`o_proj.weight` `[d, H·hd]`, `g_proj.weight` `[H·hd, d]`, `a_proj.weight` `[H, d]`,
`b_proj.weight` `[H, d]`, `A_log` `[H]`, `dt_bias` `[H]`, `o_norm.weight` `[hd]`; H the
teacher's query heads, hd its head dim. q/o_proj are shaped as the teacher's; k/v_proj have the
query heads' width so `init_from_attention` can repeat the teacher's GQA heads into them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subjective.model_registry.cache import LinearState
from subjective.model_registry.config import ModelConfig
from subjective.model_registry.delta_rule import packed_gated_delta_rule
from subjective.model_registry.llama import LlamaAttention, at_least_fp32


def l2_normalise(x: Tensor, eps: float = 1e-6) -> Tensor:
    """`x / sqrt(Σx² + eps)` over the last dim (fla's `l2norm`)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedRMSNorm(nn.Module):
    """`RMSNorm(x) · weight · silu(gate)` over each head's values (fla's `FusedRMSNormGated`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        wide = x.to(at_least_fp32(x.dtype))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * wide * F.silu(gate.to(wide.dtype))).to(x.dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads = config.num_attention_heads
        self.head_dim = hd
        width = self.heads * hd
        self.q_proj = nn.Linear(d, width, bias=False)
        self.k_proj = nn.Linear(d, width, bias=False)
        self.v_proj = nn.Linear(d, width, bias=False)
        self.g_proj = nn.Linear(d, width, bias=False)
        self.a_proj = nn.Linear(d, self.heads, bias=False)
        self.b_proj = nn.Linear(d, self.heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(self.heads))
        self.dt_bias = nn.Parameter(torch.empty(self.heads))
        self.o_norm = GatedRMSNorm(hd, config.rms_norm_eps)
        self.o_proj = nn.Linear(width, d, bias=False)
        reset_decay(self)

    def forward(
        self, x: Tensor, positions: Tensor, counts: list[int], cache: LinearState | None
    ) -> Tensor:
        """x `[N, d]` packed by sequence (`counts[b]` tokens of sequence b, in order); each
        sequence continues from its state in `cache` (zero without one), which is updated.
        `positions` is unused (no RoPE): the signature is the softmax layer's."""
        n, heads, hd = x.shape[0], self.heads, self.head_dim
        wide = at_least_fp32(x.dtype)
        q = l2_normalise(F.silu(self.q_proj(x)).view(n, heads, hd).to(wide))
        k = l2_normalise(F.silu(self.k_proj(x)).view(n, heads, hd).to(wide))
        v = F.silu(self.v_proj(x)).view(n, heads, hd).to(wide)
        g = -self.A_log.to(wide).exp() * F.softplus(self.a_proj(x).to(wide) + self.dt_bias)
        beta = torch.sigmoid(self.b_proj(x).to(wide))
        state = cache.state if cache is not None else None
        if state is None:
            state = x.new_zeros(len(counts), heads, hd, hd, dtype=wide)
        o, state = packed_gated_delta_rule(q, k, v, g, beta, 1.0 / math.sqrt(hd), counts, state)
        if cache is not None:
            cache.state = state
        gate = self.g_proj(x).view(n, heads, hd)
        o = self.o_norm(o, gate).to(x.dtype)
        return self.o_proj(o.reshape(n, heads * hd))


def reset_decay(layer: GatedDeltaNet) -> None:
    """fla's initialisation of the decay: `A ~ U(0, 16)`, `softplus(dt_bias) ~ logU(1e-3, 0.1)`."""
    heads = layer.heads
    with torch.no_grad():
        layer.A_log.copy_(torch.empty(heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(heads) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        layer.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)


@torch.no_grad()
def init_from_attention(layer: GatedDeltaNet, teacher: LlamaAttention) -> None:
    """Teacher's q_proj and o_proj copied, its k_proj/v_proj heads repeated over each GQA
    group (query head h reads KV head h // group, as `llama.attend`); the gates stay fresh."""
    if (teacher.heads, teacher.head_dim) != (layer.heads, layer.head_dim):
        raise ValueError("the linear layer needs the teacher's query heads and head dim")
    group = teacher.heads // teacher.kv_heads
    layer.q_proj.weight.copy_(teacher.q_proj.weight)
    layer.o_proj.weight.copy_(teacher.o_proj.weight)
    for ours, theirs in ((layer.k_proj, teacher.k_proj), (layer.v_proj, teacher.v_proj)):
        per_head = theirs.weight.view(teacher.kv_heads, teacher.head_dim, -1)
        ours.weight.copy_(per_head.repeat_interleave(group, dim=0).flatten(0, 1))
