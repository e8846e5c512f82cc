"""A gated layer's router and prior with their RMSNorms folded in, on vLLM's CPU GEMMs.

`Linear(RMSNorm(x)) = s(x) · (x @ (W ⊙ g)ᵀ)`, `s(x) = rsqrt(mean(x²) + ε)`: instead of a
normalised copy of x per map (each a few full passes over the tokens in float32), one scale per
token, shared by every map that reads the same input, and the norm's weight g folded into the
map's once at load. The prior's gate and up projections become one GEMM. Linear maps take
vLLM's CPU dispatch (prepacked oneDNN or sgl-kernel weights), as vLLM's own layers do.

Same math as the reference (`sdt.py`, `stt.py`); in bfloat16 the rounding moves from the
normalised input to the GEMM's output, within bfloat16's tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from subjective.model_registry.llama import RMSNorm, SwiGLU, at_least_fp32


class FoldedLinear(nn.Module):
    """`x @ weightᵀ` through vLLM's GEMM for the weight's shape on CPU."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = weight.detach().contiguous()
        self.bias = None
        self.linear = F.linear
        if self.weight.device.type == "cpu":
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(self, remove_weight=False)
            self.linear = self.cpu_linear

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x, self.weight, self.bias)


def rms_scale(x: Tensor, eps: float) -> Tensor:
    """`rsqrt(mean(x²) + ε)` per token, `[n, 1]` in float32 (as `RMSNorm` computes it)."""
    wide = x.to(at_least_fp32(x.dtype))
    return torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)


def scaled(y: Tensor, scale: Tensor) -> Tensor:
    return (y * scale).to(y.dtype)


class FoldedSwiGLU(nn.Module):
    """`SwiGLU(RMSNorm(x))` given x and its scale: one GEMM for gate and up, one for down."""

    def __init__(self, norm: RMSNorm, net: SwiGLU) -> None:
        super().__init__()
        weight = torch.cat([net.gate_proj.weight, net.up_proj.weight]) * norm.weight
        self.up = FoldedLinear(weight)
        self.down = FoldedLinear(net.down_proj.weight)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        gate, up = scaled(self.up(x), scale).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class FoldedRouter(nn.Module):
    """`Linear(RMSNorm(x))` to one logit per token, given x's scale."""

    def __init__(self, norm: RMSNorm, weight: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.map = FoldedLinear(weight * norm.weight)
        self.bias = bias.detach().float()
        self.eps = norm.eps

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        """`[n]` float32 logits (the bias added after the scale, as the reference's Linear)."""
        return (self.map(x).float() * scale).squeeze(-1) + self.bias


def fold_dynamic(layer: nn.Module) -> None:
    """SDT Dynamic layer: the router and the prior read the same x (one scale)."""
    if layer.router_norm.eps != layer.prior_norm.eps:
        raise ValueError("the router's and the prior's norms differ in ε")
    layer.folded_router = FoldedRouter(layer.router_norm, layer.router.weight, layer.router.bias)
    layer.folded_prior = FoldedSwiGLU(layer.prior_norm, layer.prior)


def fold_temporal(layer: nn.Module) -> None:
    """STT temporal layer: the router reads `[x_t, x_{t-1}]`, the transition `x_{t-1}` (one
    scale for `x_{t-1}`)."""
    if layer.router_norm.eps != layer.transition_norm.eps:
        raise ValueError("the router's and the transition's norms differ in ε")
    d = layer.router.weight.shape[1] // 2
    zero = torch.zeros_like(layer.router.bias)
    weight = layer.router.weight
    layer.folded_router_x = FoldedRouter(layer.router_norm, weight[:, :d], layer.router.bias)
    layer.folded_router_prev = FoldedRouter(layer.router_norm, weight[:, d:], zero)
    layer.folded_transition = FoldedSwiGLU(layer.transition_norm, layer.transition)
