"""Kernels of surprise-gated layers: gated prefill/decode attention and the router.

One interface for every device: each entry point runs Triton for CUDA tensors (or when forced
with ``backend="triton"``, e.g. under ``TRITON_INTERPRET=1`` on CPU) and PyTorch otherwise.
Triton is imported only when a Triton path runs. The compacted paged KV layout is described
in ``subjective.kernels.layout``.

One Dynamic layer, prefill of a packed batch (``cu`` = prompt offsets, no cached context)::

    r = route_tokens(cu, threshold, d_st=d_st, d_ch=d_ch, ma=ma, params=p)  # or logits=
    sel = r.indices                                   # kept tokens, in position order
    o = gated_prefill_attention(q[sel], k[sel], v[sel], r.cu_selected, r.cu_selected)
    write_kept_kv(k[sel], v[sel], k_cache, v_cache,
                  kept_slot_mapping(block_table, kept_lens, r.counts, block_size))
    kept_lens += r.counts
    h[sel] += r.scores[sel, None] * block_output(o)   # the rest keep h

Decode step (one token per sequence; ``cu = [0, 1, ..., B]``, or ``[0, B]`` for a cap per
batch): route, write the kept tokens' K/V the same way, then
``gated_decode_attention(q[sel], k_cache, v_cache, block_table[sel], kept_lens[sel])``.
With cached context (chunked prefill, prefix cache): ``gather_kept_kv`` reads it, and
``concat_kept_context`` puts it before each sequence's new kept K/V (``cu_seqlens_k``).
"""

from subjective.kernels.backend import Backend
from subjective.kernels.decode import gated_decode_attention
from subjective.kernels.layout import (
    concat_kept_context,
    gather_kept_kv,
    kept_slot_mapping,
    write_kept_kv,
)
from subjective.kernels.prefill import gated_prefill_attention, visible_kv_lens
from subjective.kernels.router import (
    Routing,
    StaticRouting,
    SurpriseParams,
    route_tokens,
    route_tokens_static,
    surprise_gate,
)

__all__ = [
    "Backend",
    "Routing",
    "StaticRouting",
    "SurpriseParams",
    "concat_kept_context",
    "gated_decode_attention",
    "gated_prefill_attention",
    "gather_kept_kv",
    "kept_slot_mapping",
    "route_tokens",
    "route_tokens_static",
    "surprise_gate",
    "visible_kv_lens",
    "write_kept_kv",
]
