"""The gated delta rule (Gated DeltaNet's recurrence): a recurrent and a chunked form.

Per head, with a state `S` `[K, V]`, log-decay `g_t ≤ 0`, write strength `β_t ∈ (0, 1)` and
L2-normalised `q_t`, `k_t`:

    S ← exp(g_t) · S                      (forget)
    u_t = β_t · (v_t − Sᵀ k_t)            (the delta: what the state mispredicts for k_t)
    S ← S + k_t u_tᵀ                      (write)
    o_t = scale · Sᵀ q_t                  (read)

`recurrent_gated_delta_rule` runs this token by token (decode). `chunk_gated_delta_rule`
computes the same thing a chunk of C tokens at a time (prefill): within a chunk, with
`Γ_i = exp(g_1 + … + g_i)` and `S₀` the state entering the chunk, the pseudo-values `U` solve
the unit lower-triangular system `(I + A) U = β ⊙ (V − Γ ⊙ K S₀)` where
`A_ij = β_i (Γ_i/Γ_j) k_i·k_j` for `j < i` (the WY/UT form of fla's chunk kernels); then
`O = scale · (Γ ⊙ Q S₀ + (M ⊙ Q Kᵀ) U)` with `M_ij = Γ_i/Γ_j` for `j ≤ i`, and the state leaving
the chunk is `Γ_C S₀ + Kᵀ ((Γ_C/Γ) ⊙ U)`. Both forms are exact; tests hold them to a float64
token-by-token loop.

Shapes as fla's: q, k `[B, T, H, K]`, v `[B, T, H, V]`, g, beta `[B, T, H]`, states
`[B, H, K, V]`. Zero k, v, β and g (padding at the end of a row) leave the state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_SIZE = 64


def recurrent_gated_delta_rule(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Token by token; returns the outputs `[B, T, H, V]` and the final state."""
    outputs = []
    for t in range(q.shape[1]):
        state = state * g[:, t, :, None, None].exp()
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        u = beta[:, t, :, None, None] * (v[:, t, :, None, :] - k_t @ state)  # [B, H, 1, V]
        state = state + k_t.transpose(-1, -2) @ u
        outputs.append((scale * q[:, t, :, None, :]) @ state)
    return torch.cat(outputs, dim=2).transpose(1, 2), state


def chunk_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    state: Tensor,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Chunk by chunk (rows padded at the end to a whole number of chunks); same results."""
    length = q.shape[1]
    pad = -length % chunk_size

    def chunks(x: Tensor) -> Tensor:
        """`[B, T, H, ...]` → `[B, H, n, C, ...]`, zero-padded at the end."""
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x
        x = x.transpose(1, 2)
        return x.reshape(*x.shape[:2], -1, chunk_size, *x.shape[3:])

    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    log_gamma = g.cumsum(-1)  # [B, H, n, C]
    c = torch.arange(chunk_size, device=q.device)
    causal = c[:, None] >= c[None, :]
    log_ratio = log_gamma[..., :, None] - log_gamma[..., None, :]  # log Γ_i/Γ_j
    ratio = log_ratio.masked_fill(~causal, float("-inf")).exp()
    kk = (k @ k.transpose(-1, -2)) * ratio
    a = (beta[..., None] * kk).tril(-1)
    eye = torch.eye(chunk_size, dtype=q.dtype, device=q.device)
    gamma = log_gamma.exp()[..., None]
    # U = W_u − W_k S₀ per chunk, with W_k, W_u independent of S₀: solved for every chunk at once.
    w_k = torch.linalg.solve_triangular(eye + a, beta[..., None] * gamma * k, upper=False)
    w_u = torch.linalg.solve_triangular(eye + a, beta[..., None] * v, upper=False)
    qk = (q @ k.transpose(-1, -2)) * ratio
    to_end = (log_gamma[..., -1:] - log_gamma).exp()[..., None]  # Γ_C/Γ_j
    outputs = []
    for n in range(q.shape[2]):
        u = w_u[:, :, n] - w_k[:, :, n] @ state
        outputs.append(scale * ((gamma[:, :, n] * q[:, :, n]) @ state + qk[:, :, n] @ u))
        decay = log_gamma[:, :, n, -1, None, None].exp()
        state = decay * state + k[:, :, n].transpose(-1, -2) @ (to_end[:, :, n] * u)
    out = torch.stack(outputs, dim=2).flatten(2, 3)[:, :, :length]
    return out.transpose(1, 2), state


def fla_kernels() -> tuple[Callable, Callable] | None:
    """fla's `(chunk, fused_recurrent)` gated delta rule kernels, or None without fla."""
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule as chunk,
        )
        from fla.ops.gated_delta_rule import (
            fused_recurrent_gated_delta_rule as recurrent,
        )
    except ImportError:
        return None
    return chunk, recurrent


def packed_gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    counts: list[int],
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """The rule over packed tokens (`[N, H, ...]`, `counts[b]` tokens of sequence b in order),
    each sequence from its own row of `state` `[B, H, K, V]`; returns `[N, H, V]` and the
    states after. Decode steps (one token per sequence at most) run the recurrent form, longer
    calls the chunked form; on CUDA with fla installed, fla's Triton kernels (varlen)."""
    decode = max(counts, default=0) <= 1
    kernels = fla_kernels() if q.is_cuda else None
    if kernels is not None:
        kernel = kernels[1] if decode else kernels[0]
        return _fla_packed(kernel, q, k, v, g, beta, scale, counts, state)
    batch, width = len(counts), max(counts, default=0)
    lengths = torch.tensor(counts, device=q.device)
    rows = torch.arange(width, device=q.device)[None, :] < lengths[:, None]

    def padded(x: Tensor) -> Tensor:
        out = x.new_zeros(batch, width, *x.shape[1:])
        out[rows] = x
        return out

    rule = recurrent_gated_delta_rule if decode else chunk_gated_delta_rule
    out, state = rule(*(padded(x) for x in (q, k, v, g, beta)), scale, state)
    return out[rows], state


def _fla_packed(
    kernel: Callable,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    scale: float,
    counts: list[int],
    state: Tensor,
) -> tuple[Tensor, Tensor]:
    """fla's varlen call: the non-empty sequences as one packed row with `cu_seqlens`."""
    present = [b for b, n in enumerate(counts) if n]
    cu = torch.tensor([0] + [counts[b] for b in present], device=q.device).cumsum(0)
    out, final = kernel(
        q=q[None],
        k=k[None],
        v=v[None],
        g=g[None],
        beta=beta[None],
        scale=scale,
        initial_state=state[present],
        output_final_state=True,
        cu_seqlens=cu,
    )
    state = state.clone()
    state[present] = final.to(state.dtype)
    return out[0], state
