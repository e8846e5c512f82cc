"""Gated decode attention over a layer's compacted paged KV cache (see ``layout``).

One query token per row: ``q`` is ``[N, q_heads, head_dim]`` for the sequences whose current
token was selected in this layer (pass those sequences' rows of the block table and kept
counts; the current token's own entry is written first, so it is counted in ``kept_lens``).
Reads ``kept_lens[b]`` entries per KV head, never the full sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from subjective.kernels.backend import Backend, resolve_backend


def gated_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_lens: torch.Tensor,
    *,
    scale: float | None = None,
    max_kept_len: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Returns ``[N, q_heads, head_dim]``; a row with no kept entry gets zeros.

    ``k_cache``/``v_cache``: ``[num_blocks, block_size, kv_heads, head_dim]``;
    ``block_table``: ``[N, max_blocks]`` int32; ``kept_lens``: ``[N]`` int32.
    ``max_kept_len`` (an upper bound of ``kept_lens``) sizes the Triton split-KV grid without a
    host sync; ``num_splits`` overrides the number of KV splits per sequence; ``out`` is an
    optional ``[N, q_heads, head_dim]`` buffer to write into.
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("q must be [N, Hq, D] and caches [blocks, block_size, Hkv, D]")
    if q.shape[-1] != k_cache.shape[-1] or q.shape[1] % k_cache.shape[2]:
        raise ValueError("head_dim must match and q_heads be a multiple of kv_heads")
    if block_table.shape[0] != q.shape[0] or kept_lens.numel() != q.shape[0]:
        raise ValueError("block_table and kept_lens need one row per query")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if resolve_backend(backend, q, k_cache, v_cache) == "triton":
        from subjective.kernels._decode_triton import decode_triton

        return decode_triton(
            q, k_cache, v_cache, block_table, kept_lens, scale, max_kept_len, num_splits, out=out
        )
    return decode_torch(q, k_cache, v_cache, block_table, kept_lens, scale, out=out)


def decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch path: gather kept entries padded to the longest row, then one batched SDPA."""
    out = torch.empty_like(q) if out is None else out
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    lens = kept_lens.to(q.device).long()
    width = int(lens.max()) if lens.numel() else 0
    if width == 0:
        return out.zero_()
    j = torch.arange(width, device=q.device)
    valid = j[None, :] < lens[:, None]  # [N, width]
    blocks = block_table.long().gather(
        1, (j // block_size)[None, :].expand(len(lens), -1).clamp(max=block_table.shape[1] - 1)
    )
    slots = torch.where(valid, blocks * block_size + j % block_size, 0)
    flat = (num_blocks * block_size, kv_heads, head_dim)
    # Padding reads slot 0, which may hold anything (even NaN): zero it, masking is not enough.
    pad = ~valid[:, :, None, None]
    k = k_cache.view(flat)[slots].masked_fill(pad, 0).transpose(1, 2)  # [N, Hkv, width, D]
    v = v_cache.view(flat)[slots].masked_fill(pad, 0).transpose(1, 2)
    attended = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )[:, :, 0]
    out.copy_(torch.where((lens > 0)[:, None, None], attended, 0))
    return out
