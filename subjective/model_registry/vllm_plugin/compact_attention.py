"""Attention of a gated layer over its compacted entries, stored in vLLM's own KV allocation.

vLLM allocates the layer's pages (`kv_spec`: γ of a dense page per block, or a dense page) and
hands them over as the layer's `kv_cache`. Only kept tokens write entries: the c-th kept entry
of a request goes to slot c of its blocks, and its queries attend causally in that compacted
order, which is exactly a chunked-prefill step of a sequence whose length is the kept count.

- On CPU the pages keep the layout of vLLM's CPU attention backend (per block: each KV head's
  K entries, then its V entries), `page_entries` per block, and vLLM's own kernels write and
  attend (`cpu_attn_reshape_and_cache`, `cpu_attention_with_kv_cache`), with the kept counts
  as the sequence lengths: a kept token costs what a dense one does.
- Elsewhere the pages hold the compacted layout of `subjective.kernels.layout` (the K entries
  of block b, then its V entries): viewed as `2·num_blocks` kernel blocks, K of block b is
  kernel block `2b` of `k_cache` and V its twin in `v_cache`, so one block table (`2 ·`
  vLLM's) serves both; our Triton kernels attend.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from vllm import _custom_ops as vllm_ops
from vllm import envs

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
    if q.device.type == "cpu":
        return cpu_backend_attention(attn, q, k, v, block_table, kept_before, new, rows)
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


def cpu_backend_attention(
    attn: nn.Module,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_table: Tensor,
    kept_before: Tensor,
    new: Tensor,
    rows: Tensor,
) -> Tensor:
    """`compact_attention` through vLLM's CPU attention kernels, on pages in their layout.

    A block of the layer's cache is `[kv_heads, 2 · page_entries, head]` (K rows, then V rows),
    the layout `CPUAttentionBackendImpl` reads with `page_entries` as its block size; each row's
    query is its new kept tokens and its sequence its kept entries so far.
    """
    impl, cache = attn.impl, attn.kv_cache
    heads, kv_heads, head = attn.num_heads, attn.num_kv_heads, attn.head_size
    entries = getattr(attn, "page_entries", cache.shape[2])
    pages = cache.view(cache.shape[0], kv_heads, 2 * entries, head)
    k_cache, v_cache = pages.chunk(2, dim=2)
    slots = kept_slot_mapping(block_table, kept_before, new, entries, seq=rows)
    scales = {"k_scale": attn._k_scale_float, "v_scale": attn._v_scale_float}
    vllm_ops.cpu_attn_reshape_and_cache(
        k.view(-1, kv_heads, head),
        v.view(-1, kv_heads, head),
        k_cache,
        v_cache,
        slots,
        attn.isa,
        kv_cache_dtype=impl.kv_cache_dtype,
        **scales,
    )
    seq_lens = (kept_before + new).to(torch.int32)
    query_start = torch.nn.functional.pad(torch.cumsum(new, 0), (1, 0)).to(torch.int32)
    schedule = vllm_ops.cpu_attn_get_scheduler_metadata(
        num_reqs=new.numel(),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head,
        seq_lens=seq_lens,
        dtype=q.dtype,
        query_start_loc=query_start,
        causal=True,
        sliding_window_size=-1,
        isa=attn.isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        kv_cache_dtype=impl.kv_cache_dtype,
    )
    out = torch.empty_like(q).view(-1, heads, head)
    vllm_ops.cpu_attention_with_kv_cache(
        query=q.view(-1, heads, head),
        key_cache=k_cache,
        value_cache=v_cache,
        output=out,
        query_start_loc=query_start,
        seq_lens=seq_lens,
        scale=impl.scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_table,
        softcap=0.0,
        scheduler_metadata=schedule,
        s_aux=None,
        kv_cache_dtype=impl.kv_cache_dtype,
        **scales,
    )
    return out.view(q.shape)
