"""Smaller KV pages for gated layers, so vLLM's own allocator admits more sequences.

vLLM allocates KV blocks per token position for every layer of a group. A gated layer stores
its kept entries compacted (`compact_attention`), so with a capacity cap γ it needs only
`γ · block_size` entry slots per block. `CompactedAttention` declares exactly that to vLLM: a
`FullAttentionSpec` with the same block size (one shared block table) and the head size
scaled by γ, i.e. γ of the dense page bytes. All layers stay full attention of one block size,
so vLLM puts them in one `UniformTypeKVCacheSpecs` group whose block is the sum of the layers'
pages: the budget then holds `1 / (1 - (1 - γ) · gated / layers)` times as many blocks.

Inside a gated layer's page the entries follow the kernels' compacted layout
(`compact_attention.kv_pages`). The cap: the c-th kept entry of a
request can only be written once the request owns `c // page_entries + 1` blocks, so a token at
position p is kept only while `c < page_entries · (p // block_size + 1)` (`within_capacity`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheSpec

KERNEL_BLOCK_MULTIPLE = 32  # keeps pages whole multiples of the kernels' tiles
# hf_overrides key: γ of the gated layers' pages (default: the routing config's capacity);
# 1.0 gives them dense pages and no cap (exact reference decisions at any length).
KV_CAPACITY_OVERRIDE = "kv_capacity"
ROW_OFFSET = 1 << 40  # keeps rows apart in `within_capacity`'s cumulative minimum


def page_entries_for(capacity: float, block_size: int) -> int:
    """Entry slots per block of a gated layer: γ·block_size, rounded down to a kernel block."""
    entries = int(capacity * block_size) // KERNEL_BLOCK_MULTIPLE * KERNEL_BLOCK_MULTIPLE
    return min(max(entries, KERNEL_BLOCK_MULTIPLE), block_size)


class CompactedAttention(Attention):
    """vLLM `Attention` whose pages hold `page_entries` compacted entries per block.

    The sizes are fixed when vLLM asks for the spec (the block size is final by then).
    """

    capacity: float
    block_size: int
    page_entries: int

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec | None:
        spec = super().get_kv_cache_spec(vllm_config)
        if not isinstance(spec, FullAttentionSpec):
            raise NotImplementedError(f"compacted pages need full attention, not {spec}")
        self.block_size = spec.block_size
        self.page_entries = page_entries_for(self.capacity, spec.block_size)
        if self.page_entries >= spec.block_size:
            return spec
        if (spec.head_size * self.page_entries) % spec.block_size:
            raise ValueError(f"{self.page_entries}/{spec.block_size} of a page is no whole head")
        head = spec.head_size * self.page_entries // spec.block_size
        head_v = spec.head_size_v * self.page_entries // spec.block_size
        return replace(spec, head_size=head, head_size_v=head_v)


def make_compacted(attn: Attention, capacity: float) -> None:
    """Turn a gated layer's vLLM `Attention` into a `CompactedAttention` (before KV set-up)."""
    attn.__class__ = CompactedAttention
    attn.capacity = capacity


def within_capacity(
    selected: Tensor,
    positions: Tensor,
    counts: Tensor,
    before: Tensor,
    page_entries: int,
    block_size: int,
) -> Tensor:
    """`selected` without the tokens whose compacted entry would not fit the request's pages.

    Tokens are grouped by row (`counts[r]` of row r, `before[r]` entries kept earlier). Token j
    is kept while its row's count so far is below its limit `L_j`: `c_j = min(c_{j-1} + s_j,
    L_j)`, whose closed form `c_j = S_j + min(before, min_{k<=j} (L_k - S_k))` (`S`: the row's
    running count of selected tokens) takes one cumulative minimum. Rows stay apart in that
    minimum by an offset that falls from row to row.
    """
    device = selected.device
    counts = torch.as_tensor(counts, dtype=torch.long, device=device)
    before = torch.as_tensor(before, dtype=torch.long, device=device)
    n = selected.numel()
    rows = torch.repeat_interleave(
        torch.arange(counts.numel(), device=device), counts, output_size=n
    )
    limit = page_entries * (positions.to(device).long() // block_size + 1)
    chosen = selected.long()
    running = torch.cumsum(chosen, 0)
    row_start = torch.cumsum(counts, 0) - counts
    base = torch.nn.functional.pad(running, (1, 0))[row_start]  # selected before each row
    within = running - base[rows]  # S_j
    offset = rows * ROW_OFFSET
    floor = torch.cummin(limit - within - offset, 0).values + offset
    kept = within + torch.minimum(before[rows], floor)  # c_j
    earlier = torch.cat([kept.new_zeros(1), kept[:-1]])
    earlier = torch.where(torch.arange(n, device=device) == row_start[rows], before[rows], earlier)
    return selected & (earlier < limit)
