"""Triton router kernel: one program per segment scores, thresholds, caps and compacts.

The cap finds the ``capacity``-th largest candidate score by bisection over order-preserving
integer keys of the float32 scores (32 counting passes over the segment, no sort), then keeps
the keys above it plus the earliest ties.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from subjective.kernels.backend import interpreting
from subjective.kernels.router import SurpriseParams


@triton.jit
def _sortable_key(score):
    """int64 key with the order of the float32 scores (negatives flip their magnitude bits).

    Adding +0.0 turns -0.0 into +0.0, so the two zeros tie as they compare equal.
    """
    bits = (score + 0.0).to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _router_kernel(
    LOGITS, DST, DCH, MA, CU, SCORES, MASK, SLOTS, COUNTS,
    threshold, capacity, beta_ce, beta_cu, log_o_ce, m_cu,
    USE_LOGITS: tl.constexpr,
    HAS_CAP: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    seg = tl.program_id(0)
    start = tl.load(CU + seg)
    end = tl.load(CU + seg + 1)
    lanes = tl.arange(0, BLOCK)

    num_cand = tl.full([], 0, tl.int32)
    for chunk in range(start, end, BLOCK):
        i = chunk + lanes
        ok = i < end
        if USE_LOGITS:
            score = tl.load(LOGITS + i, mask=ok, other=0.0).to(tl.float32)
        else:
            d_st = tl.load(DST + i, mask=ok, other=0.0).to(tl.float32)
            d_ch = tl.load(DCH + i, mask=ok, other=0.0).to(tl.float32)
            ma = tl.load(MA + i, mask=ok, other=0.0).to(tl.float32)
            s_ce = tl.sigmoid(beta_ce * (d_st - (d_ch - log_o_ce)))
            s_cu = tl.sigmoid(beta_cu * (d_st - m_cu * ma))
            score = s_ce + s_cu - s_ce * s_cu
        tl.store(SCORES + i, score, mask=ok)
        num_cand += tl.sum(((score > threshold) & ok).to(tl.int32), 0)
    tl.debug_barrier()

    # Cut key: keep candidates with key > cut, plus the first `need_eq` with key == cut.
    cut = tl.full([], -(2**40), tl.int64)
    need_eq = tl.full([], 0, tl.int32)
    if HAS_CAP:  # noqa: SIM102 (a constexpr test cannot share an `and` with a tensor)
        if num_cand > capacity:
            lo = tl.full([], -(2**31), tl.int64)
            hi = tl.full([], 2**31 - 1, tl.int64)
            for _ in range(32):
                mid = (lo + hi + 1) >> 1
                count = tl.full([], 0, tl.int32)
                for chunk in range(start, end, BLOCK):
                    i = chunk + lanes
                    ok = i < end
                    score = tl.load(SCORES + i, mask=ok, other=0.0)
                    hit = ok & (score > threshold) & (_sortable_key(score) >= mid)
                    count += tl.sum(hit.to(tl.int32), 0)
                lo = tl.where(count >= capacity, mid, lo)
                hi = tl.where(count >= capacity, hi, mid - 1)
            above = tl.full([], 0, tl.int32)
            for chunk in range(start, end, BLOCK):
                i = chunk + lanes
                ok = i < end
                score = tl.load(SCORES + i, mask=ok, other=0.0)
                hit = ok & (score > threshold) & (_sortable_key(score) > lo)
                above += tl.sum(hit.to(tl.int32), 0)
            cut = lo
            need_eq = capacity - above

    taken = tl.full([], 0, tl.int32)
    ties = tl.full([], 0, tl.int32)
    for chunk in range(start, end, BLOCK):
        i = chunk + lanes
        ok = i < end
        score = tl.load(SCORES + i, mask=ok, other=0.0)
        cand = ok & (score > threshold)
        key = _sortable_key(score)
        tie = (cand & (key == cut)).to(tl.int32)
        tie_rank = ties + tl.cumsum(tie, 0) - tie
        chosen = cand & ((key > cut) | ((tie > 0) & (tie_rank < need_eq)))
        chosen_i = chosen.to(tl.int32)
        rank = taken + tl.cumsum(chosen_i, 0) - chosen_i
        tl.store(MASK + i, chosen_i.to(tl.int8), mask=ok)
        tl.store(SLOTS + start + rank, i, mask=chosen)
        taken += tl.sum(chosen_i, 0)
        ties += tl.sum(tie, 0)
    tl.store(COUNTS + seg, taken)
    for chunk in range(start + taken, end, BLOCK):
        i = chunk + lanes
        tl.store(SLOTS + i, tl.full([BLOCK], -1, tl.int32), mask=i < end)


def router_config(interp: bool) -> dict:
    """Tokens per chunk (one program walks its whole segment chunk by chunk)."""
    return {"BLOCK": 16} if interp else {"BLOCK": 1024, "num_warps": 4}


def router_triton(
    cu_seqlens: torch.Tensor,
    threshold: float,
    logits: torch.Tensor | None,
    d_st: torch.Tensor | None,
    d_ch: torch.Tensor | None,
    ma: torch.Tensor | None,
    params: SurpriseParams,
    capacity: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(scores, mask, slots, counts)`` as in ``router.StaticRouting``."""
    first = logits if logits is not None else d_st
    assert first is not None
    num_tokens = first.numel()
    device = first.device
    cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
    num_segs = cu.numel() - 1
    scores = _empty((num_tokens,), torch.float32, device)
    mask = _empty((num_tokens,), torch.int8, device)
    slots = _empty((num_tokens,), torch.int32, device)
    counts = _empty((num_segs,), torch.int32, device)
    if num_segs > 0:
        dummy = scores  # placeholder pointer for the unused inputs
        config = router_config(interpreting())
        _router_kernel[(num_segs,)](
            *(t.contiguous() if t is not None else dummy for t in (logits, d_st, d_ch, ma)),
            cu, scores, mask, slots, counts,
            float(threshold), int(capacity or 0),
            float(params.beta_ce), float(params.beta_cu),
            math.log(float(params.o_ce)), float(params.m_cu),
            USE_LOGITS=logits is not None,
            HAS_CAP=capacity is not None,
            **config,
        )  # fmt: skip
    return scores, mask.view(torch.bool), slots, counts


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)
