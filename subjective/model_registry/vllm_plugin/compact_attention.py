"""Attention of a gated layer over its compacted entries, stored in vLLM's own KV allocation.

vLLM allocates the layer's pages (`kv_spec`: γ of a dense page per block, or a dense page) and
hands them over as the layer's `kv_cache`; their bytes hold the compacted paged layout of
`subjective.kernels.layout`: the K entries of block b, then its V entries, `page_entries` each.
Viewed as `2·num_blocks` kernel blocks, K of block b is kernel block `2b` of `k_cache` and V its
twin in `v_cache` (the same view shifted by one block), so one block table (`2 ·` vLLM's) serves
both. Only kept tokens write entries; the c-th kept entry of a request goes to slot c of its
blocks, and its queries attend causally in that compacted order. The kernels pick Triton for
CUDA tensors and their PyTorch path on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from subjective.kernels import (
    gated_decode_attention,
    gated_prefill_attention,
    gather_kept_kv,
    kept_slot_mapping,
    write_kept_kv,
)


def kv_pages(attn: nn.Module) -> tuple[Tensor, Tensor, int]:
    """`(k_cache, v_cache, page_entries)` in the kernels' layout, over the layer's vLLM pages."""
    cache = attn.kv_cache
    blocks = cache.shape[0]
    entries = getattr(attn, "page_entries", cache.shape[2])
    kv_heads, head = attn.num_kv_heads, attn.head_size
    half = entries * kv_heads * head
    if cache.stride(0) != 2 * half or not cache[0].is_contiguous():
        raise NotImplementedError(
            f"gated layers need each KV block as one dense page (stride {cache.stride()})"
        )
    full = torch.as_strided(
        cache, (2 * blocks, entries, kv_heads, head), (half, kv_heads * head, head, 1)
    )
    return full[:-1], full[1:], entries


def compact_attention(
    attn: nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor,
    kept_before: Tensor,
    new: Tensor,
    rows: Tensor,
    max_new: int,
) -> Tensor:
    """Write the new entries compacted, then attend; q `[n, H·hd]`, k, v `[n, H_kv·hd]`.

    Token i belongs to row `rows[i]` (rows in order, `new[r]` tokens of row r), `kept_before[r]`
    entries are already stored; `max_new` bounds `new` (vLLM's longest query, on the host).
    Every row at once: decode (`max_new == 1`) reads straight from the pages, longer queries
    attend over the rows' gathered entries in one batched call. Returns `[n, H·hd]`.
    """
    if q.shape[0] == 0:
        return torch.zeros_like(q)
    k_cache, v_cache, entries = kv_pages(attn)
    heads, kv_heads, head = attn.num_heads, attn.num_kv_heads, attn.head_size
    table = 2 * block_table
    slots = kept_slot_mapping(table, kept_before, new, entries, seq=rows)
    write_kept_kv(k.view(-1, kv_heads, head), v.view(-1, kv_heads, head), k_cache, v_cache, slots)
    kept = (kept_before + new).to(device=q.device, dtype=torch.int32)
    queries = q.view(-1, heads, head)
    if max_new == 1:  # decode: one query per row, read straight from the pages
        result = gated_decode_attention(queries, k_cache, v_cache, table[rows], kept[rows])
    else:
        keys, values, cu_k = gather_kept_kv(k_cache, v_cache, table, kept)
        cu_q = torch.zeros(new.numel() + 1, dtype=torch.int32, device=q.device)
        cu_q[1:] = torch.cumsum(new, 0)
        result = gated_prefill_attention(queries, keys, values, cu_q, cu_k, max_seqlen_q=max_new)
    return result.reshape(q.shape).to(q.dtype)
