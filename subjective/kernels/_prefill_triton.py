"""Triton kernel of the gated prefill: flash attention over packed, prefix-masked sequences."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from subjective.kernels.backend import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    Q, K, V, OUT, CU_Q, CU_K, KV_LENS,
    qk_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_end = tl.load(CU_Q + seq + 1)
    if q_start + pid_m * BLOCK_M >= q_end:
        return
    k_start = tl.load(CU_K + seq).to(tl.int64)
    kv_head = head // GROUP

    rows = q_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_end
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    rows64 = rows.to(tl.int64)
    q = tl.load(
        Q + rows64[:, None] * stride_qn + head * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)
    kv_lens = tl.load(KV_LENS + rows, mask=row_ok, other=0)
    hi = tl.max(kv_lens, 0)

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        keys = (k_start + cols)[:, None]
        k = tl.load(
            K + keys * stride_kn + kv_head * stride_kh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            V + keys * stride_vn + kv_head * stride_vh + dims[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        visible = cols[None, :] < kv_lens[:, None]
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        OUT + rows64[:, None] * stride_on + head * stride_oh + dims[None, :],
        out.to(OUT.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def prefill_config(head_dim: int, dtype: torch.dtype, interp: bool) -> dict:
    """Tiles and launch options (GPU: bf16/fp16 tensor-core tiles; fp32 smaller to fit SMEM)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interp:
        return {"BLOCK_D": block_d, "BLOCK_M": 16, "BLOCK_N": 16, "DOT_F32": True}
    if dtype == torch.float32:
        return {"BLOCK_D": block_d, "BLOCK_M": 32, "BLOCK_N": 32, "DOT_F32": True,
                "num_warps": 4, "num_stages": 2}  # fmt: skip
    return {
        "BLOCK_D": block_d,
        "BLOCK_M": 128 if block_d <= 64 else 64,
        "BLOCK_N": 64,
        "DOT_F32": False,
        "num_warps": 4,
        "num_stages": 3,
    }


def prefill_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    max_seqlen_q: int | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the prefill kernel: one program per (query tile, sequence, query head)."""
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    num_q, q_heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    if out.stride(-1) != 1:
        raise ValueError("out needs a contiguous head_dim")
    num_seqs = cu_seqlens_q.numel() - 1
    if num_q == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int(cu_seqlens_q.diff().max())
    config = prefill_config(head_dim, q.dtype, interpreting())
    grid = (triton.cdiv(max(max_seqlen_q, 1), config["BLOCK_M"]), num_seqs, q_heads)
    _prefill_kernel[grid](
        q, k, v, out,
        cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), kv_lens.to(torch.int32),
        scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=q_heads // k.shape[1],
        HEAD_DIM=head_dim,
        **config,
    )  # fmt: skip
    return out
