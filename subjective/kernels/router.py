"""Router: surprise gate (or router logits) + threshold + optional capacity cap, in one kernel.

Tokens are packed by segment (``cu_seqlens``, ``[B + 1]``): a segment is a sequence in
prefill, or the whole decode batch when the cap is per batch (``cu_seqlens = [0, B]``).

Score per token (DESIGN.md §3), unless ``logits`` are given (then the score is the logit)::

    S_CE = σ(β_ce · (D_st − (D_ch − log o_ce)))
    S_CU = σ(β_cu · (D_st − m_cu · MA))
    g    = S_CE + S_CU − S_CE · S_CU

A token is a candidate when ``score > threshold``; with ``capacity`` set, a segment keeps its
``capacity`` highest-scoring candidates (ties go to the earlier token). Selected indices stay
in position order, which is the order of the compacted KV entries (see ``layout``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from subjective.kernels.backend import Backend, resolve_backend


@dataclass(frozen=True)
class SurpriseParams:
    """Gate constants; pass ``o_ce``/``m_cu`` as learned, β as annealed at the end of training."""

    beta_ce: float = 1.0
    beta_cu: float = 1.0
    o_ce: float = 1.025
    m_cu: float = 1.1


class StaticRouting(NamedTuple):
    """Static-shape result: no host sync, every tensor sized by the number of tokens."""

    scores: torch.Tensor  # [T] float32: g, or the logits
    mask: torch.Tensor  # [T] bool: selected
    slots: torch.Tensor  # [T] int32: segment b's picks at cu[b] .. cu[b]+counts[b]-1, then -1
    counts: torch.Tensor  # [B] int32: selected per segment


class Routing(NamedTuple):
    """Compacted result, ready for ``gated_prefill_attention`` (``cu_selected`` = cu_seqlens_q)."""

    scores: torch.Tensor  # [T] float32
    mask: torch.Tensor  # [T] bool
    indices: torch.Tensor  # [N_selected] int64, global token indices in position order
    counts: torch.Tensor  # [B] int32
    cu_selected: torch.Tensor  # [B + 1] int32


def route_tokens_static(
    cu_seqlens: torch.Tensor,
    threshold: float,
    *,
    logits: torch.Tensor | None = None,
    d_st: torch.Tensor | None = None,
    d_ch: torch.Tensor | None = None,
    ma: torch.Tensor | None = None,
    params: SurpriseParams | None = None,
    capacity: int | None = None,
    backend: Backend = "auto",
) -> StaticRouting:
    """Score, threshold and cap every token of every segment; shapes depend only on T and B.

    Give either ``logits`` ([T]) or all of ``d_st``, ``d_ch``, ``ma`` ([T] each).
    """
    inputs = _inputs(logits, d_st, d_ch, ma)
    if capacity is not None and capacity < 0:
        raise ValueError("capacity must be >= 0")
    params = params or SurpriseParams()
    if resolve_backend(backend, *inputs) == "triton":
        from subjective.kernels._router_triton import router_triton

        return StaticRouting(
            *router_triton(cu_seqlens, threshold, logits, d_st, d_ch, ma, params, capacity)
        )
    return _router_torch(cu_seqlens, threshold, logits, d_st, d_ch, ma, params, capacity)


def route_tokens(
    cu_seqlens: torch.Tensor,
    threshold: float,
    *,
    logits: torch.Tensor | None = None,
    d_st: torch.Tensor | None = None,
    d_ch: torch.Tensor | None = None,
    ma: torch.Tensor | None = None,
    params: SurpriseParams | None = None,
    capacity: int | None = None,
    backend: Backend = "auto",
) -> Routing:
    """Like ``route_tokens_static``, then compacts the indices (one host sync for their count)."""
    r = route_tokens_static(
        cu_seqlens,
        threshold,
        logits=logits,
        d_st=d_st,
        d_ch=d_ch,
        ma=ma,
        params=params,
        capacity=capacity,
        backend=backend,
    )
    cu_selected = torch.zeros(r.counts.numel() + 1, dtype=torch.int32, device=r.counts.device)
    cu_selected[1:] = torch.cumsum(r.counts, 0)
    indices = r.slots[r.slots >= 0].long()
    return Routing(r.scores, r.mask, indices, r.counts, cu_selected)


def surprise_gate(
    d_st: torch.Tensor, d_ch: torch.Tensor, ma: torch.Tensor, params: SurpriseParams
) -> torch.Tensor:
    """The gate ``g`` in float32 (PyTorch)."""
    d_st, d_ch, ma = (t.float() for t in (d_st, d_ch, ma))
    s_ce = torch.sigmoid(params.beta_ce * (d_st - (d_ch - math.log(params.o_ce))))
    s_cu = torch.sigmoid(params.beta_cu * (d_st - params.m_cu * ma))
    return s_ce + s_cu - s_ce * s_cu


def _router_torch(
    cu_seqlens: torch.Tensor,
    threshold: float,
    logits: torch.Tensor | None,
    d_st: torch.Tensor | None,
    d_ch: torch.Tensor | None,
    ma: torch.Tensor | None,
    params: SurpriseParams,
    capacity: int | None,
) -> StaticRouting:
    scores = (
        logits.float() if logits is not None else surprise_gate(d_st, d_ch, ma, params)  # type: ignore[arg-type]
    )
    mask = scores > threshold
    cu = cu_seqlens.to(scores.device).long()
    num_segs = cu.numel() - 1
    seg = torch.repeat_interleave(
        torch.arange(num_segs, device=cu.device), cu.diff(), output_size=scores.numel()
    )
    if capacity is not None:
        cand = mask.nonzero().flatten()
        # Order candidates by segment, then score descending, then position (stable sorts).
        by_score = torch.sort(scores[cand], descending=True, stable=True).indices
        order = by_score[torch.sort(seg[cand][by_score], stable=True).indices]
        cand_counts = torch.bincount(seg[cand], minlength=num_segs)
        first = torch.cumsum(cand_counts, 0) - cand_counts
        rank = torch.arange(cand.numel(), device=cu.device) - first[seg[cand][order]]
        mask[cand[order[rank >= capacity]]] = False
    chosen = mask.nonzero().flatten()
    counts = torch.bincount(seg[chosen], minlength=num_segs)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(chosen.numel(), device=cu.device) - first[seg[chosen]]
    slots = torch.full_like(scores, -1, dtype=torch.int32)
    slots[cu[:-1][seg[chosen]] + rank] = chosen.to(torch.int32)
    counts = counts.to(torch.int32)
    return StaticRouting(scores, mask, slots, counts)


def _inputs(
    logits: torch.Tensor | None,
    d_st: torch.Tensor | None,
    d_ch: torch.Tensor | None,
    ma: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    surprise = (d_st, d_ch, ma)
    if logits is not None:
        if any(t is not None for t in surprise):
            raise ValueError("give logits or (d_st, d_ch, ma), not both")
        return (logits,)
    if any(t is None for t in surprise):
        raise ValueError("give logits, or all of d_st, d_ch and ma")
    return surprise  # type: ignore[return-value]
