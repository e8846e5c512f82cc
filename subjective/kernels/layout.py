"""Compacted paged KV cache of one Dynamic layer, and torch helpers to fill and read it.

Layout (one instance per Dynamic layer; the vLLM plugin builds its cache spec on it):

- ``k_cache``, ``v_cache``: ``[num_blocks, block_size, kv_heads, head_dim]`` each, the dtype of
  the model (bf16/fp16 on GPU, any float on CPU). Only *kept* entries are stored: a token that
  skipped this layer writes nothing here.
- ``block_table``: ``[num_seqs, max_blocks_per_seq]`` int32, **per layer** (layers keep
  different tokens, so they fill their blocks at different rates). Row ``b`` lists the physical
  blocks of sequence ``b`` in this layer, in order; entries past the ones in use are ignored.
- ``kept_lens``: ``[num_seqs]`` int32, how many entries sequence ``b`` has kept in this layer.
- Entries are compacted and in position order: the ``j``-th kept token of sequence ``b`` (the
  ``j``-th selected token counting from position 0) lives at
  ``block = block_table[b, j // block_size]``, ``offset = j % block_size``, i.e. flat slot
  ``block * block_size + offset`` of the ``[num_blocks * block_size, kv_heads, head_dim]`` view.
  No positions are stored: rotary embeddings are applied to keys before they are written, and
  causality needs only the order (queries of a Dynamic layer are exactly its kept tokens, so
  the ``i``-th new kept token attends entries ``0 .. kept_before + i``).

So a sequence holds ``ceil(kept_lens[b] / block_size)`` blocks in the layer instead of
``ceil(seq_len / block_size)``, and attention reads ``kept_lens[b]`` entries per KV head.
"""

from __future__ import annotations

import torch


def kept_slot_mapping(
    block_table: torch.Tensor,
    kept_before: torch.Tensor,
    new_counts: torch.Tensor,
    block_size: int,
    seq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Flat cache slots for new kept entries, packed by sequence: ``[sum(new_counts)]`` int64.

    Sequence ``b`` appends ``new_counts[b]`` entries after its ``kept_before[b]`` ones; the
    block table must already hold enough blocks for them. ``seq`` (the sequence of each new
    entry, when the caller has it) spares expanding the counts, and its size a host read.
    """
    device = block_table.device
    counts = new_counts.to(device=device, dtype=torch.long)
    if seq is None:
        seq = torch.repeat_interleave(torch.arange(counts.numel(), device=device), counts)
    seq = seq.to(device)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(seq.numel(), device=device) - starts[seq]
    j = kept_before.to(device=device, dtype=torch.long)[seq] + rank
    blocks = block_table.long()[seq, j // block_size]
    return blocks * block_size + j % block_size


def write_kept_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``[n, kv_heads, head_dim]`` keys/values at flat ``slot_mapping`` slots, in place."""
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    flat = (num_blocks * block_size, kv_heads, head_dim)
    slots = slot_mapping.to(device=k_cache.device, dtype=torch.long)
    k_cache.view(flat).index_copy_(0, slots, k_new.to(k_cache.dtype))
    v_cache.view(flat).index_copy_(0, slots, v_new.to(v_cache.dtype))


def gather_kept_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    kept_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read every sequence's kept entries into packed ``[sum(kept), kv_heads, head_dim]`` tensors.

    Returns ``(k, v, cu_kept)`` with ``cu_kept`` ``[num_seqs + 1]`` int32 offsets. Used by the
    torch decode path and to prepend cached context to a chunked prefill.
    """
    num_blocks, block_size, kv_heads, head_dim = k_cache.shape
    zeros = torch.zeros_like(kept_lens)
    slots = kept_slot_mapping(block_table, zeros, kept_lens, block_size)
    flat = (num_blocks * block_size, kv_heads, head_dim)
    k = k_cache.view(flat).index_select(0, slots)
    v = v_cache.view(flat).index_select(0, slots)
    cu = torch.zeros(kept_lens.numel() + 1, dtype=torch.int32, device=kept_lens.device)
    cu[1:] = torch.cumsum(kept_lens, 0)
    return k, v, cu


def concat_kept_context(
    k_ctx: torch.Tensor,
    v_ctx: torch.Tensor,
    cu_ctx: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    cu_new: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence, cached kept entries then new ones: the keys of a chunked prefill.

    Returns packed ``(k, v, cu_seqlens_k)``; with the new kept tokens as queries
    (``cu_seqlens_q = cu_new``), ``gated_prefill_attention`` needs no positions.
    """
    device = k_new.device
    cu_ctx, cu_new = cu_ctx.to(device).long(), cu_new.to(device).long()
    n_ctx, n_new = cu_ctx.diff(), cu_new.diff()
    num_seqs = n_ctx.numel()
    seq_ctx = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), n_ctx, output_size=k_ctx.shape[0]
    )
    seq_new = torch.repeat_interleave(
        torch.arange(num_seqs, device=device), n_new, output_size=k_new.shape[0]
    )
    # Entry i of the context moves right by the new entries of earlier sequences, and so on.
    dest_ctx = torch.arange(k_ctx.shape[0], device=device) + cu_new[:-1][seq_ctx]
    dest_new = torch.arange(k_new.shape[0], device=device) + cu_ctx[1:][seq_new]
    total = k_ctx.shape[0] + k_new.shape[0]
    k = k_new.new_empty((total, *k_new.shape[1:]))
    v = v_new.new_empty((total, *v_new.shape[1:]))
    k[dest_ctx], v[dest_ctx] = k_ctx.to(k.dtype), v_ctx.to(v.dtype)
    k[dest_new], v[dest_new] = k_new, v_new
    return k, v, (cu_ctx + cu_new).to(torch.int32)
