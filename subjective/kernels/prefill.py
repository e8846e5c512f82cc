"""Gated prefill attention for one Dynamic layer: varlen, causal by original position, GQA.

Tensors are packed by sequence (vLLM's varlen layout):

- ``q``: ``[Nq, q_heads, head_dim]``, only the tokens selected in this layer;
  ``cu_seqlens_q``: ``[B + 1]`` int32 offsets of each sequence's queries.
- ``k``, ``v``: ``[Nk, kv_heads, head_dim]``, only the tokens kept in this layer (cached ones
  from earlier chunks first, see ``layout.gather_kept_kv``, then the new ones), in position
  order; ``cu_seqlens_k``: ``[B + 1]`` int32 offsets.
- ``q_pos`` / ``k_pos``: original positions (int). Key ``j`` is visible to query ``i`` of the
  same sequence iff ``k_pos[j] <= q_pos[i]``. Leave both ``None`` for the usual case where the
  queries are the last ``Nq_b`` keys of each sequence (query ``i`` of a sequence then sees keys
  ``0 .. Nk_b - Nq_b + i``), which needs no positions at all.

A query that sees no key gets zeros. ``q_heads`` must be a multiple of ``kv_heads``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subjective.kernels.backend import Backend, resolve_backend


def visible_kv_lens(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[Nq]`` int32: how many leading keys of its sequence each query may attend.

    With keys sorted by position, "``k_pos <= q_pos``" is a prefix of the sequence's keys, so
    one count per query describes the causal mask. Computed on device, without host sync.
    """
    if (q_pos is None) != (k_pos is None):
        raise ValueError("give both q_pos and k_pos, or neither")
    device = cu_seqlens_q.device
    cu_q = cu_seqlens_q.long()
    cu_k = cu_seqlens_k.to(device).long()
    nq, nk = cu_q.diff(), cu_k.diff()
    num_q = q_pos.numel() if q_pos is not None else None
    seq_q = torch.repeat_interleave(torch.arange(nq.numel(), device=device), nq, output_size=num_q)
    rank = torch.arange(seq_q.numel(), device=device) - cu_q[:-1][seq_q]
    if q_pos is None:
        return ((nk - nq)[seq_q] + rank + 1).clamp_(min=0).to(torch.int32)
    seq_k = torch.repeat_interleave(
        torch.arange(nk.numel(), device=device), nk, output_size=k_pos.numel()
    )
    # Sequence id in the high bits makes one global sorted array for searchsorted.
    global_k = (seq_k << 32) + k_pos.to(device).long()
    global_q = (seq_q << 32) + q_pos.to(device).long()
    found = torch.searchsorted(global_k, global_q, right=True)
    return (found - cu_k[:-1][seq_q]).to(torch.int32)


def gated_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    max_seqlen_q: int | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Attention of the selected queries over the kept keys; returns ``[Nq, q_heads, head_dim]``.

    ``max_seqlen_q`` (longest query run of a sequence) sizes the Triton grid; pass it to avoid
    a host sync. ``out``: optional ``[Nq, q_heads, head_dim]`` buffer to write into.
    ``backend``: ``auto`` (Triton on CUDA, PyTorch otherwise), ``triton``, ``torch``.
    """
    _check_shapes(q, k, v, cu_seqlens_q, cu_seqlens_k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kv_lens = visible_kv_lens(cu_seqlens_q, cu_seqlens_k, q_pos, k_pos)
    if resolve_backend(backend, q, k, v) == "triton":
        from subjective.kernels._prefill_triton import prefill_triton

        return prefill_triton(
            q, k, v, cu_seqlens_q, cu_seqlens_k, kv_lens, scale, max_seqlen_q, out=out
        )
    return prefill_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_lens, scale, out=out)


def prefill_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    kv_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch path: every sequence at once, padded to the longest, in one masked SDPA."""
    out = torch.empty_like(q) if out is None else out
    if q.shape[0] == 0:
        return out
    seq_q, col_q, width_q = _packed_index(cu_seqlens_q.to(q.device), q.shape[0])
    seq_k, col_k, width_k = _packed_index(cu_seqlens_k.to(q.device), k.shape[0])
    num_seqs = cu_seqlens_q.numel() - 1
    queries = q.new_zeros(num_seqs, width_q, *q.shape[1:])
    queries[seq_q, col_q] = q
    keys = k.new_zeros(num_seqs, width_k, *k.shape[1:])
    values = v.new_zeros(num_seqs, width_k, *v.shape[1:])
    keys[seq_k, col_k], values[seq_k, col_k] = k, v
    lens = kv_lens.to(q.device).long()
    visible = torch.zeros(num_seqs, width_q, dtype=torch.long, device=q.device)
    visible[seq_q, col_q] = lens
    mask = torch.arange(width_k, device=q.device)[None, None, :] < visible[:, :, None]
    attended = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=True,
    ).transpose(1, 2)[seq_q, col_q]
    out.copy_(torch.where((lens > 0)[:, None, None], attended, 0))
    return out


def _packed_index(cu: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sequence and rank of each of `total` packed items, and the longest sequence."""
    cu = cu.long()
    counts = cu.diff()
    seq = torch.repeat_interleave(
        torch.arange(counts.numel(), device=cu.device), counts, output_size=total
    )
    width = int(counts.max()) if counts.numel() else 0
    return seq, torch.arange(total, device=cu.device) - cu[:-1][seq], width


def _check_shapes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError("q must be [Nq, Hq, D] and k, v [Nk, Hkv, D]")
    if q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError("head_dim must match and q_heads be a multiple of kv_heads")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same sequences")
