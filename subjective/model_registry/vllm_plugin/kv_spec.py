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
    counts: list[int],
    before: list[int],
    page_entries: int,
    block_size: int,
) -> Tensor:
    """`selected` without the tokens whose compacted entry would not fit the request's pages."""
    limit = page_entries * (positions.cpu() // block_size + 1)
    chosen_t = selected.cpu()
    ends = torch.cumsum(torch.tensor(counts), 0)
    running = torch.cumsum(chosen_t.long(), 0)
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), running[ends[:-1] - 1]])
    rows = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    index = torch.tensor(before)[rows] + running - row_start[rows] - 1
    if not bool((chosen_t & (index >= limit)).any()):
        return selected  # the usual case: nothing reaches the cap
    limit, chosen = limit.tolist(), chosen_t.tolist()
    start = 0
    for count, kept in zip(counts, before, strict=True):
        for j in range(start, start + count):
            if chosen[j]:
                if kept < limit[j]:
                    kept += 1
                else:
                    chosen[j] = False
        start += count
    return torch.tensor(chosen, dtype=torch.bool, device=selected.device)
