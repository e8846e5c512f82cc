"""The surprise gate (DESIGN.md §3): expected (CE) and unexpected (CU) change, combined.

Mean squared distance stands in for KL under isotropic Gaussians:
`D_st = ||H_post - H||²/d`, `D_ch = ||H_post - H_prior||²/d`,
`CE = D_st - (D_ch - log o_ce)`, `CU = D_st - m_cu * MA(D_st)`,
`g = S_CE + S_CU - S_CE * S_CU` with `S_x = sigmoid(beta_x * x)` (a probabilistic OR).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from subjective.model_registry.cache import GateState


def mean_squared_norm(x: Tensor) -> Tensor:
    """`||x||² / d` per row of `[N, d]`, as a batched dot product.

    Written as a matmul on purpose: its 2·d FLOPs per row then show up in torch's FLOP counter
    exactly as `flops.py` counts them (elementwise forms would be invisible to it).
    """
    return (x.unsqueeze(-2) @ x.unsqueeze(-1)).reshape(x.shape[:-1]) / x.shape[-1]


class SurpriseGate(nn.Module):
    """Learnable `o_ce`, `m_cu`; `beta_ce`, `beta_cu` are buffers so training can anneal them."""

    def __init__(
        self, o_ce: float = 1.025, m_cu: float = 1.1, beta_ce: float = 1.0, beta_cu: float = 1.0
    ) -> None:
        super().__init__()
        self.o_ce = nn.Parameter(torch.tensor(float(o_ce)))
        self.m_cu = nn.Parameter(torch.tensor(float(m_cu)))
        self.register_buffer("beta_ce", torch.tensor(float(beta_ce)))
        self.register_buffer("beta_cu", torch.tensor(float(beta_cu)))

    def set_beta(self, beta_ce: float, beta_cu: float) -> None:
        self.beta_ce.fill_(beta_ce)
        self.beta_cu.fill_(beta_cu)

    def forward(self, d_st: Tensor, d_ch: Tensor, moving_average: Tensor) -> Tensor:
        log_o = torch.log(self.o_ce.clamp_min(1e-6))
        expected = d_st - (d_ch - log_o)
        unexpected = d_st - self.m_cu * moving_average.detach()
        s_ce = torch.sigmoid(self.beta_ce * expected)
        s_cu = torch.sigmoid(self.beta_cu * unexpected)
        return s_ce + s_cu - s_ce * s_cu


def causal_moving_average(
    values: Tensor, counts: list[int], window: int, state: GateState | None = None
) -> Tensor:
    """Mean of the `window` values *before* each one in its sequence (no gradient).

    `values` is packed by sequence (`counts[b]` values of sequence b, in order). Earlier values
    come from `state.d_st_history` when decoding incrementally; the state is then updated. A
    value with nothing before it is its own average. Float64 prefix sums keep chunked and
    one-shot evaluation equal to rounding.
    """
    values = values.detach()
    out = torch.empty_like(values)
    start = 0
    for b, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        start += count
        new = values[rows].double()
        history = None if state is None else state.d_st_history[b]
        earlier = new.new_zeros(0) if history is None else history.double()
        series = torch.cat([earlier, new])
        prefix = torch.cat([series.new_zeros(1), series.cumsum(0)])
        index = torch.arange(earlier.numel(), series.numel(), device=series.device)
        lo = (index - window).clamp_min(0)
        total = prefix[index] - prefix[lo]
        n_before = (index - lo).to(series.dtype)
        mean = torch.where(n_before > 0, total / n_before.clamp_min(1), series[index])
        out[rows] = mean.to(values.dtype)
        if state is not None:
            state.d_st_history[b] = series[-window:].to(values.dtype)
    return out


def topk_mask(scores: Tensor, valid: Tensor, capacity: float) -> Tensor:
    """Training-time selection: the top `ceil(capacity · n_b)` valid tokens of each row."""
    length = scores.shape[1]
    masked = scores.detach().masked_fill(~valid, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(length, device=scores.device).expand_as(order))
    keep = torch.ceil(capacity * valid.sum(dim=1).double()).long()
    return (ranks < keep[:, None]) & valid


def threshold_mask(router_logits: Tensor, valid: Tensor, threshold: Tensor) -> Tensor:
    """Inference-time selection: router probability above `threshold[b]` (causal, per token).

    Compared in logit space (`logit > logit(threshold)`, strict), as `subjective.kernels.router`
    compares a score with its threshold, so a kernel given `logit(threshold)` decides the same.
    """
    cut = torch.logit(threshold.float().clamp(0.0, 1.0))
    return (router_logits.float() > cut[:, None]) & valid
