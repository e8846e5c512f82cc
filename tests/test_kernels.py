"""Gated attention and router kernels against float64 references (Triton runs interpreted on CPU).

Every Triton output (and the decode's split scratch) is poisoned before the kernel runs, so an
element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from subjective.kernels import (
    SurpriseParams,
    concat_kept_context,
    gated_decode_attention,
    gated_prefill_attention,
    gather_kept_kv,
    kept_slot_mapping,
    route_tokens,
    route_tokens_static,
    write_kept_kv,
)
from subjective.kernels.backend import resolve_backend

BACKENDS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter() -> Iterator[None]:
    """Triton on this CPU needs its interpreter; scoped to this module, not the whole run."""
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel-allocated buffers start as NaN (floats) or a sentinel (ints)."""
    import subjective.kernels._decode_triton as decode_mod
    import subjective.kernels._router_triton as router_mod

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fill = math.nan if dtype.is_floating_point else -77
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(decode_mod, "_empty", poisoned)
    monkeypatch.setattr(router_mod, "_empty", poisoned)


def seed_of(*parts: object) -> int:
    """Deterministic per-case seed (str hashes change between runs)."""
    return zlib.crc32(repr(parts).encode())


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, math.nan)


# ----------------------------------------------------------------------------- references


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One sequence, float64: query i attends keys with k_pos <= q_pos[i]; none visible -> 0."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale
    visible = k_pos[None, None, :] <= q_pos[None, :, None]
    logits = logits.masked_fill(~visible, -math.inf)
    weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", weights, v)


@dataclass
class Batch:
    """A ragged batch of one Dynamic layer: kept keys (cached + new) and selected queries."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    expected: torch.Tensor  # float64


def cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def make_batch(
    gen: torch.Generator,
    cached: list[int],
    new: list[int],
    keep_prob: list[float],
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
) -> Batch:
    """Sequence b has `cached[b]` earlier positions and `new[b]` new tokens; routing is random."""
    q_heads, kv_heads = heads
    qs, ks, q_pos, k_pos, nq, nk = [], [], [], [], [], []
    for p_cached, n_new, prob in zip(cached, new, keep_prob, strict=True):
        positions = torch.arange(p_cached + n_new)
        kept = torch.rand(p_cached + n_new, generator=gen) < prob
        sel_new = positions[p_cached:][kept[p_cached:]]
        keys = positions[kept]
        qs.append(sel_new)
        ks.append(keys)
        nq.append(sel_new.numel())
        nk.append(keys.numel())
    q_pos = torch.cat(qs).int()
    k_pos = torch.cat(ks).int()
    q = torch.randn(q_pos.numel(), q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(k_pos.numel(), kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(k_pos.numel(), kv_heads, head_dim, generator=gen).to(dtype)
    cu_q, cu_k = cu(nq), cu(nk)
    scale = head_dim**-0.5
    parts = [
        reference_attention(
            q[cu_q[b] : cu_q[b + 1]],
            k[cu_k[b] : cu_k[b + 1]],
            v[cu_k[b] : cu_k[b + 1]],
            q_pos[cu_q[b] : cu_q[b + 1]],
            k_pos[cu_k[b] : cu_k[b + 1]],
            scale,
        )
        for b in range(len(new))
    ]
    expected = torch.cat(parts) if parts else torch.zeros(0, q_heads, head_dim)
    return Batch(q, k, v, q_pos, k_pos, cu_q, cu_k, expected.reshape(q.shape))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    assert not actual.isnan().any(), "unwritten (NaN) elements"
    torch.testing.assert_close(actual.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


# ----------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_positions", [False, True])
def test_prefill_random_ragged(backend: str, dtype: torch.dtype, use_positions: bool) -> None:
    gen = torch.Generator().manual_seed(seed_of(backend, dtype, use_positions))
    batch = make_batch(
        gen,
        cached=[0, 9, 0, 5, 0],
        new=[23, 17, 1, 0, 12],
        keep_prob=[0.5, 0.3, 1.0, 0.5, 0.0],
        heads=(6, 2),
        head_dim=24,
        dtype=dtype,
    )
    positions = (batch.q_pos, batch.k_pos) if use_positions else (None, None)
    out = gated_prefill_attention(
        batch.q,
        batch.k,
        batch.v,
        batch.cu_q,
        batch.cu_k,
        *positions,
        out=poisoned_like(batch.q),
        backend=backend,
    )
    assert_close(out, batch.expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("new", "keep_prob"),
    [
        ([8, 5], [0.0, 0.0]),  # nothing selected
        ([19, 7], [1.0, 1.0]),  # everything selected (dense causal)
        ([1], [1.0]),  # one token
        ([0, 1, 0], [1.0, 1.0, 1.0]),  # empty sequences around one token
    ],
)
def test_prefill_edge_cases(backend: str, new: list[int], keep_prob: list[float]) -> None:
    gen = torch.Generator().manual_seed(len(new))
    batch = make_batch(
        gen, [0] * len(new), new, keep_prob, heads=(4, 4), head_dim=16, dtype=torch.float32
    )
    out = gated_prefill_attention(
        batch.q, batch.k, batch.v, batch.cu_q, batch.cu_k, backend=backend
    )
    assert out.shape == batch.q.shape
    assert_close(out, batch.expected, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_general_positions(backend: str) -> None:
    """Queries need not be keys: some see no key at all (zeros), GQA group of 3, head_dim 64."""
    gen = torch.Generator().manual_seed(7)
    q_pos = torch.tensor([0, 3, 4, 10, 2, 6], dtype=torch.int32)
    k_pos = torch.tensor([1, 2, 4, 8, 0, 5, 6, 7], dtype=torch.int32)
    cu_q, cu_k = cu([4, 2]), cu([4, 4])
    # Strided views of fused projections, as a model produces them.
    q = torch.randn(6, 6 * 64 + 5, generator=gen)[:, :384].view(6, 6, 64)
    kv = torch.randn(8, 2 * 2 * 64, generator=gen)
    k, v = kv[:, :128].view(8, 2, 64), kv[:, 128:].view(8, 2, 64)
    assert not q.is_contiguous() and not k.is_contiguous()
    scale = 0.3
    expected = torch.cat(
        [
            reference_attention(q[:4], k[:4], v[:4], q_pos[:4], k_pos[:4], scale),
            reference_attention(q[4:], k[4:], v[4:], q_pos[4:], k_pos[4:], scale),
        ]
    )
    out = gated_prefill_attention(
        q, k, v, cu_q, cu_k, q_pos, k_pos, scale=scale, max_seqlen_q=4,
        out=poisoned_like(q), backend=backend,
    )  # fmt: skip
    assert_close(out, expected, torch.float32)
    assert out[0].abs().max() == 0  # position 0 precedes every key of sequence 0


# ----------------------------------------------------------------------------- decode


def build_paged_cache(
    gen: torch.Generator,
    kept_lens: list[int],
    block_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Compacted caches with shuffled physical blocks; unused slots hold NaN."""
    blocks_per_seq = [math.ceil(n / block_size) for n in kept_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks, never referenced
    perm = torch.randperm(num_blocks, generator=gen)
    width = max([*blocks_per_seq, 1])
    table = torch.full((len(kept_lens), width), 10_000, dtype=torch.int32)  # junk past the end
    used = 0
    for b, n in enumerate(blocks_per_seq):
        table[b, :n] = perm[used : used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, math.nan, dtype=dtype)
    v_cache = torch.full(shape, math.nan, dtype=dtype)
    lens = torch.tensor(kept_lens, dtype=torch.int32)
    k = torch.randn(sum(kept_lens), kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(sum(kept_lens), kv_heads, head_dim, generator=gen).to(dtype)
    slots = kept_slot_mapping(table, torch.zeros_like(lens), lens, block_size)
    write_kept_kv(k, v, k_cache, v_cache, slots)
    return k_cache, v_cache, table, lens, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_random_paged(backend: str, dtype: torch.dtype, num_splits: int | None) -> None:
    gen = torch.Generator().manual_seed(seed_of(backend, dtype, num_splits))
    kept_lens = [0, 1, 8, 37, 16, 5, 70]  # 70: two splits by default on CPU
    q_heads, kv_heads, head_dim, block_size = 6, 2, 24, 8
    k_cache, v_cache, table, lens, k, v = build_paged_cache(
        gen, kept_lens, block_size, kv_heads, head_dim, dtype
    )
    q = torch.randn(len(kept_lens), q_heads, head_dim, generator=gen).to(dtype)
    out = gated_decode_attention(
        q,
        k_cache,
        v_cache,
        table,
        lens,
        num_splits=num_splits,
        out=poisoned_like(q),
        backend=backend,
    )
    offsets = cu(kept_lens)
    expected = torch.stack(
        [
            reference_attention(
                q[b : b + 1],
                k[offsets[b] : offsets[b + 1]],
                v[offsets[b] : offsets[b + 1]],
                torch.tensor([n]),
                torch.arange(n),
                head_dim**-0.5,
            )[0]
            for b, n in enumerate(kept_lens)
        ]
    )
    assert_close(out, expected, dtype)
    assert out[0].abs().max() == 0  # nothing kept: zeros


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_single_token_mha(backend: str) -> None:
    gen = torch.Generator().manual_seed(3)
    k_cache, v_cache, table, lens, k, v = build_paged_cache(gen, [1], 1, 4, 16, torch.float32)
    q = torch.randn(1, 4, 16, generator=gen)
    out = gated_decode_attention(q, k_cache, v_cache, table, lens, max_kept_len=1, backend=backend)
    assert_close(out, v.double(), torch.float32)  # one key: softmax weight 1


# ----------------------------------------------------------------------------- router


def reference_routing(
    scores: torch.Tensor, cu_seqlens: torch.Tensor, threshold: float, capacity: int | None
) -> torch.Tensor:
    """Selected mask, one segment and token at a time in plain Python."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        cand = [i for i in range(bounds[b], bounds[b + 1]) if scores[i].item() > threshold]
        cand.sort(key=lambda i: (-scores[i].item(), i))
        for i in cand if capacity is None else cand[:capacity]:
            mask[i] = True
    return mask


def check_routing(
    result_static, result, cu_seqlens: torch.Tensor, expected_mask: torch.Tensor
) -> None:
    assert torch.equal(result_static.mask, expected_mask)
    bounds = cu_seqlens.tolist()
    counts = [int(expected_mask[bounds[b] : bounds[b + 1]].sum()) for b in range(len(bounds) - 1)]
    assert result_static.counts.tolist() == counts
    for b, n in enumerate(counts):
        seg = result_static.slots[bounds[b] : bounds[b + 1]]
        chosen = expected_mask[bounds[b] : bounds[b + 1]].nonzero().flatten() + bounds[b]
        assert seg[:n].tolist() == chosen.tolist()
        assert (seg[n:] == -1).all()
    assert result.indices.tolist() == expected_mask.nonzero().flatten().tolist()
    assert result.cu_selected.tolist() == cu(counts).tolist()


SEGMENTS = [[13, 0, 1, 40, 6], [1], [0], [64]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", [None, 0, 1, 3, 100])
@pytest.mark.parametrize("segments", SEGMENTS)
def test_router_logits_with_ties(backend: str, capacity: int | None, segments: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(segments) + (capacity or -1))
    cu_seqlens = cu(segments)
    # Few distinct values, negatives included: many ties at the cap.
    logits = (torch.randint(-4, 5, (sum(segments),), generator=gen) * 0.5).to(torch.bfloat16)
    threshold = -0.75
    args = {"logits": logits, "capacity": capacity, "backend": backend}
    static = route_tokens_static(cu_seqlens, threshold, **args)
    compact = route_tokens(cu_seqlens, threshold, **args)
    assert torch.equal(static.scores, logits.float())
    expected = reference_routing(logits.float(), cu_seqlens, threshold, capacity)
    check_routing(static, compact, cu_seqlens, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", [None, 4])
def test_router_surprise_gate(backend: str, capacity: int | None) -> None:
    gen = torch.Generator().manual_seed(11)
    segments = [30, 1, 0, 17]
    cu_seqlens = cu(segments)
    n = sum(segments)
    d_st = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    d_ch = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    ma = torch.rand(n, generator=gen, dtype=torch.float64) * 2
    params = SurpriseParams(beta_ce=3.0, beta_cu=2.0, o_ce=1.025, m_cu=1.1)
    s_ce = torch.sigmoid(params.beta_ce * (d_st - (d_ch - math.log(params.o_ce))))
    s_cu = torch.sigmoid(params.beta_cu * (d_st - params.m_cu * ma))
    gate = s_ce + s_cu - s_ce * s_cu  # float64
    threshold = float(gate.median())
    keep = (gate - threshold).abs() > 1e-4  # no token within rounding of the threshold
    inputs = {"d_st": d_st[keep].float(), "d_ch": d_ch[keep].float(), "ma": ma[keep].float()}
    counts = [int(keep[a:b].sum()) for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
    cu_kept = cu(counts)
    args = {**inputs, "params": params, "capacity": capacity, "backend": backend}
    static = route_tokens_static(cu_kept, threshold, **args)
    compact = route_tokens(cu_kept, threshold, **args)
    torch.testing.assert_close(static.scores.double(), gate[keep], atol=1e-6, rtol=1e-6)
    # Ranking under the cap is checked on the kernel's own float32 scores (ties included).
    expected = reference_routing(static.scores, cu_kept, threshold, capacity)
    if capacity is None:
        assert torch.equal(expected, gate[keep] > threshold)
    check_routing(static, compact, cu_kept, expected)


def test_router_rejects_mixed_inputs() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError):
        route_tokens(cu([3]), 0.5, logits=x, d_st=x)
    with pytest.raises(ValueError):
        route_tokens(cu([3]), 0.5, d_st=x, d_ch=x)


# ----------------------------------------------------------------------------- layout, dispatch


def test_slot_mapping_appends_after_kept_entries() -> None:
    table = torch.tensor([[5, 2, 9], [7, 0, 1]], dtype=torch.int32)
    slots = kept_slot_mapping(table, torch.tensor([3, 0]), torch.tensor([2, 5]), block_size=4)
    # seq 0: entries 3, 4 -> block 5 offset 3, block 2 offset 0; seq 1: entries 0..4.
    assert slots.tolist() == [23, 8, 28, 29, 30, 31, 0]


def test_gather_kept_kv_round_trip() -> None:
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, table, lens, k, v = build_paged_cache(gen, [3, 0, 9], 4, 2, 8, torch.float32)
    k_read, v_read, cu_kept = gather_kept_kv(k_cache, v_cache, table, lens)
    assert torch.equal(k_read, k) and torch.equal(v_read, v)
    assert cu_kept.tolist() == [0, 3, 3, 12]


def test_auto_backend_is_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(1)
    assert resolve_backend("auto", x) == "torch"
    assert resolve_backend("triton", x) == "triton"  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError):
        resolve_backend("triton", x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_prefill_then_decode(backend: str) -> None:
    """Route a prompt, prefill the kept tokens, write them compacted, then decode two steps:
    each step must equal dense attention restricted to the kept tokens."""
    gen = torch.Generator().manual_seed(21)
    prompts, q_heads, kv_heads, head_dim, block_size = [11, 6], 4, 2, 16, 4
    cu_prompt = cu(prompts)
    total = sum(prompts) + 2 * len(prompts)
    logits = torch.randn(total, generator=gen)
    logits[cu_prompt[:-1].long()] = 5.0  # first token of each prompt is kept
    queries = torch.randn(total, q_heads, head_dim, generator=gen)
    keys = torch.randn(total, kv_heads, head_dim, generator=gen)
    values = torch.randn(total, kv_heads, head_dim, generator=gen)
    # Token layout: prompts packed first, then one decode token per sequence per step.
    owners = [b for b, n in enumerate(prompts) for _ in range(n)] + [0, 1, 0, 1]
    positions = [p for n in prompts for p in range(n)] + [11, 6, 12, 7]

    routing = route_tokens(cu_prompt, 0.0, logits=logits[: sum(prompts)], backend=backend)
    sel = routing.indices
    out = gated_prefill_attention(
        queries[sel], keys[sel], values[sel], routing.cu_selected, routing.cu_selected,
        backend=backend,
    )  # fmt: skip

    num_blocks = 16
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), math.nan)
    v_cache = torch.full_like(k_cache, math.nan)
    table = torch.tensor([[3, 8, 1, 12], [6, 0, 15, 4]], dtype=torch.int32)
    kept = torch.zeros(2, dtype=torch.int32)
    slots = kept_slot_mapping(table, kept, routing.counts, block_size)
    write_kept_kv(keys[sel], values[sel], k_cache, v_cache, slots)
    kept += routing.counts

    def expected_for(token: int) -> torch.Tensor:
        mine = [
            t
            for t in range(total)
            if owners[t] == owners[token]
            and positions[t] <= positions[token]
            and logits[t] > 0
            and t <= token
        ]
        idx = torch.tensor(mine)
        pos = torch.tensor(positions)
        return reference_attention(
            queries[token : token + 1], keys[idx], values[idx], pos[token : token + 1],
            pos[idx], head_dim**-0.5,
        )[0]  # fmt: skip

    for i, token in enumerate(sel.tolist()):
        torch.testing.assert_close(out[i].double(), expected_for(token), atol=2e-5, rtol=2e-5)

    for step in range(2):
        step_tokens = torch.arange(2) + sum(prompts) + 2 * step
        step_routing = route_tokens(cu([1, 1]), 0.0, logits=logits[step_tokens], backend=backend)
        chosen = step_tokens[step_routing.mask]
        new_slots = kept_slot_mapping(table, kept, step_routing.counts, block_size)
        write_kept_kv(keys[chosen], values[chosen], k_cache, v_cache, new_slots)
        kept += step_routing.counts
        rows = step_routing.mask.nonzero().flatten()
        decoded = gated_decode_attention(
            queries[chosen], k_cache, v_cache, table[rows], kept[rows], backend=backend
        )
        for i, token in enumerate(chosen.tolist()):
            torch.testing.assert_close(
                decoded[i].double(), expected_for(token), atol=2e-5, rtol=2e-5
            )


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_reads_cached_context(backend: str) -> None:
    """Second prompt chunk: cached kept entries + new kept ones as keys, new ones as queries."""
    gen = torch.Generator().manual_seed(33)
    chunks = [[5, 4], [6, 0], [0, 3]]  # per sequence: first chunk, second chunk
    q_heads, kv_heads, head_dim, block_size = 6, 3, 16, 2
    lengths = [a + b for a, b in chunks]
    queries = [torch.randn(n, q_heads, head_dim, generator=gen) for n in lengths]
    keys = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in lengths]
    values = [torch.randn(n, kv_heads, head_dim, generator=gen) for n in lengths]
    logits = [torch.randn(n, generator=gen) for n in lengths]

    k_cache = torch.full((32, block_size, kv_heads, head_dim), math.nan)
    v_cache = torch.full_like(k_cache, math.nan)
    table = torch.randperm(30, generator=gen)[:30].view(3, 10).int()
    kept = torch.zeros(3, dtype=torch.int32)

    def run_chunk(part: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        spans = [(0, a) if part == 0 else (a, a + b) for a, b in chunks]
        cu_chunk = cu([e - s for s, e in spans])
        chunk_logits = torch.cat([lg[s:e] for lg, (s, e) in zip(logits, spans, strict=True)])
        routing = route_tokens(cu_chunk, 0.0, logits=chunk_logits, backend=backend)
        tokens = [(b, p) for b, (s, e) in enumerate(spans) for p in range(s, e)]
        chosen = [tokens[i] for i in routing.indices.tolist()]
        q_new = torch.stack([queries[b][p] for b, p in chosen]) if chosen else None
        k_new = torch.stack([keys[b][p] for b, p in chosen]) if chosen else None
        v_new = torch.stack([values[b][p] for b, p in chosen]) if chosen else None
        if q_new is None:
            return torch.zeros(0, q_heads, head_dim), chosen
        k_ctx, v_ctx, cu_ctx = gather_kept_kv(k_cache, v_cache, table, kept)
        k_all, v_all, cu_all = concat_kept_context(
            k_ctx, v_ctx, cu_ctx, k_new, v_new, routing.cu_selected
        )
        out = gated_prefill_attention(
            q_new, k_all, v_all, routing.cu_selected, cu_all, out=poisoned_like(q_new),
            backend=backend,
        )  # fmt: skip
        slots = kept_slot_mapping(table, kept, routing.counts, block_size)
        write_kept_kv(k_new, v_new, k_cache, v_cache, slots)
        kept.add_(routing.counts)
        return out, chosen

    for part in (0, 1):
        out, chosen = run_chunk(part)
        for i, (b, p) in enumerate(chosen):
            visible = [t for t in range(p + 1) if logits[b][t] > 0]
            idx = torch.tensor(visible)
            expected = reference_attention(
                queries[b][p : p + 1], keys[b][idx], values[b][idx],
                torch.tensor([p]), idx, head_dim**-0.5,
            )[0]  # fmt: skip
            torch.testing.assert_close(out[i].double(), expected, atol=2e-5, rtol=2e-5)
    assert kept.tolist() == [int((lg > 0).sum()) for lg in logits]
