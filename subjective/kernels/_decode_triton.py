"""Triton kernels of the gated decode: split-KV flash decoding over compacted paged blocks.

Each program takes one sequence, one KV head and one slice of its kept entries, with all the
query heads of that KV head's group stacked as the rows of one tile, so every K/V byte is read
once per group. A second kernel merges the slices (log-sum-exp weights).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subjective.kernels.backend import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, KC, VC, BT, KEPT, O_PART, M_PART, L_PART,
    qk_scale, split_len, num_splits,
    stride_qn, stride_qh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    kept = tl.load(KEPT + seq)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kept)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    heads = kv_head * GROUP + g
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        Q + seq.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + dims[None, :],
        mask=g_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        j_ok = j < hi
        block = tl.load(BT + seq.to(tl.int64) * stride_bt + j // BLOCK_SIZE, mask=j_ok, other=0)
        offset = j % BLOCK_SIZE
        block64 = block.to(tl.int64)
        ld_mask = j_ok[:, None] & dim_ok[None, :]
        k = tl.load(
            KC
            + (block64 * stride_kb + offset * stride_ks + kv_head * stride_kh)[:, None]
            + dims[None, :],
            mask=ld_mask,
            other=0.0,
        )
        v = tl.load(
            VC
            + (block64 * stride_vb + offset * stride_vs + kv_head * stride_vh)[:, None]
            + dims[None, :],
            mask=ld_mask,
            other=0.0,
        )
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(j_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # Every split writes, even an empty one (l = 0), so the merge never reads garbage.
    part = (seq.to(tl.int64) * (tl.num_programs(1) * GROUP) + heads) * num_splits + split
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        O_PART + part[:, None] * HEAD_DIM + dims[None, :],
        out,
        mask=g_ok[:, None] & dim_ok[None, :],
    )
    tl.store(M_PART + part, m_i, mask=g_ok)
    tl.store(L_PART + part, l_i, mask=g_ok)


@triton.jit
def _decode_merge_kernel(
    O_PART, M_PART, L_PART, OUT,
    num_splits,
    stride_on, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq.to(tl.int64) * tl.num_programs(1) + head
    s = tl.arange(0, BLOCK_S)
    s_ok = s < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    m = tl.load(M_PART + row * num_splits + s, mask=s_ok, other=-1.0e30)
    l_part = tl.load(L_PART + row * num_splits + s, mask=s_ok, other=0.0)
    o = tl.load(
        O_PART + (row * num_splits + s)[:, None] * HEAD_DIM + dims[None, :],
        mask=s_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    weight = l_part * tl.math.exp2(m - tl.max(m, 0))
    total = tl.sum(weight, 0)
    out = tl.sum(o * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(
        OUT + seq.to(tl.int64) * stride_on + head * stride_oh + dims,
        out.to(OUT.dtype.element_ty),
        mask=dim_ok,
    )


def decode_config(head_dim: int, group: int, dtype: torch.dtype, interp: bool) -> dict:
    """Tiles and launch options; the group's query heads are padded to 16 rows for the dots."""
    config = {
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_N": 16 if interp else 64,
        "DOT_F32": interp or dtype == torch.float32,
    }
    return config if interp else config | {"num_warps": 4, "num_stages": 2}


def decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_lens: torch.Tensor,
    scale: float,
    max_kept_len: int | None,
    num_splits: int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch split and merge kernels; splits fill the GPU when there are few sequences."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("KV caches need a contiguous head_dim")
    num_seqs, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if out.stride(-1) != 1:
        raise ValueError("out needs a contiguous head_dim")
    if num_seqs == 0:
        return out
    group = q_heads // kv_heads
    config = decode_config(head_dim, group, q.dtype, interpreting())
    block_n = config["BLOCK_N"]
    if max_kept_len is None:
        max_kept_len = int(kept_lens.max())
    max_kept_len = max(max_kept_len, 1)
    if num_splits is None:
        num_splits = _default_splits(num_seqs * kv_heads, max_kept_len, block_n, q.device)
    split_len = triton.cdiv(triton.cdiv(max_kept_len, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_kept_len, split_len)

    rows = num_seqs * q_heads * num_splits
    o_part = _empty((rows, head_dim), torch.float32, q.device)
    m_part = _empty((rows,), torch.float32, q.device)
    l_part = _empty((rows,), torch.float32, q.device)
    table = block_table.to(torch.int32).contiguous()
    _decode_split_kernel[(num_seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, table, kept_lens.to(torch.int32),
        o_part, m_part, l_part,
        scale * LOG2E, split_len, num_splits,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        **config,
    )  # fmt: skip
    _decode_merge_kernel[(num_seqs, q_heads)](
        o_part, m_part, l_part, out,
        num_splits,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=config["BLOCK_D"],
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
    )  # fmt: skip
    return out


def _default_splits(programs: int, max_kept_len: int, block_n: int, device: torch.device) -> int:
    """Enough KV slices to give each SM a few programs, none shorter than 4 tiles."""
    if device.type != "cuda":
        return 1 if max_kept_len <= 4 * block_n else 2
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(2 * sms, programs)
    return max(1, min(wanted, triton.cdiv(max_kept_len, 4 * block_n)))


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scratch allocation (one place, so tests can poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)
