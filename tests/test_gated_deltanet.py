"""Gated DeltaNet: the chunked and recurrent forms of the gated delta rule against a float64
token-by-token loop, packed ragged batches, state carried across calls, and the teacher init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from subjective.model_registry.cache import LinearState
from subjective.model_registry.delta_rule import (
    chunk_gated_delta_rule,
    packed_gated_delta_rule,
    recurrent_gated_delta_rule,
)
from subjective.model_registry.gated_deltanet import GatedDeltaNet, init_from_attention
from subjective.model_registry.llama import LlamaAttention
from subjective.model_registry.tiny import tiny_config


def naive_rule(q, k, v, g, beta, scale, state) -> tuple[Tensor, Tensor]:
    """The recurrence written out per sequence, head and token, in float64."""
    q, k, v, g, beta, state = (x.double() for x in (q, k, v, g, beta, state))
    batch, length, heads, _ = q.shape
    out = torch.zeros(batch, length, heads, v.shape[-1], dtype=torch.float64)
    state = state.clone()
    for b in range(batch):
        for h in range(heads):
            s = state[b, h]
            for t in range(length):
                s = s * math.exp(g[b, t, h])
                delta = beta[b, t, h] * (v[b, t, h] - s.T @ k[b, t, h])
                s = s + torch.outer(k[b, t, h], delta)
                out[b, t, h] = scale * (s.T @ q[b, t, h])
            state[b, h] = s
    return out, state


def random_inputs(batch: int, length: int, heads: int = 3, dk: int = 8, dv: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(batch, length, heads, dk, generator=gen), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, dk, generator=gen), dim=-1)
    v = torch.randn(batch, length, heads, dv, generator=gen)
    g = -F.softplus(torch.randn(batch, length, heads, generator=gen)) * 0.3
    beta = torch.rand(batch, length, heads, generator=gen)
    state = torch.randn(batch, heads, dk, dv, generator=gen)
    return q, k, v, g, beta, state


@pytest.mark.parametrize("length", [1, 7, 16, 23])
def test_chunked_and_recurrent_equal_float64_loop(length: int) -> None:
    q, k, v, g, beta, state = random_inputs(2, length)
    expected, expected_state = naive_rule(q, k, v, g, beta, 0.35, state)
    for rule in (recurrent_gated_delta_rule, chunk_gated_delta_rule):
        kwargs = {"chunk_size": 8} if rule is chunk_gated_delta_rule else {}
        out, final = rule(q, k, v, g, beta, 0.35, state, **kwargs)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final.double(), expected_state, atol=1e-5, rtol=1e-5)


def test_chunked_in_float64_is_exact_across_many_chunks() -> None:
    q, k, v, g, beta, state = (x.double() for x in random_inputs(1, 150, seed=1))
    expected, expected_state = naive_rule(q, k, v, g, beta, 0.5, state)
    out, final = chunk_gated_delta_rule(q, k, v, g, beta, 0.5, state)  # 64-token chunks
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(final, expected_state, atol=1e-12, rtol=1e-12)


def test_packed_ragged_batch_equals_each_sequence_alone() -> None:
    counts = [5, 0, 12, 1]
    q, k, v, g, beta, state = random_inputs(1, sum(counts), seed=2)
    states = torch.randn(len(counts), *state.shape[1:], generator=torch.Generator().manual_seed(3))
    out, final = packed_gated_delta_rule(q[0], k[0], v[0], g[0], beta[0], 0.4, counts, states)
    start = 0
    for b, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        one = [x[:, rows] for x in (q, k, v, g, beta)]
        expected, expected_state = naive_rule(*one, 0.4, states[b : b + 1])
        torch.testing.assert_close(out[rows].double(), expected[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[b].double(), expected_state[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(final[1], states[1]), "a sequence with no tokens keeps its state"


def layer_and_inputs(seed: int = 4) -> tuple[GatedDeltaNet, Tensor]:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(tiny_config()).double().eval()
    x = torch.randn(40, layer.q_proj.in_features, dtype=torch.float64)
    return layer, x


def test_layer_state_carried_across_calls_equals_one_shot() -> None:
    layer, x = layer_and_inputs()
    # Two sequences of 25 and 15 tokens, fed as prefill chunks then single-token decode steps.
    first, second = x[:25], x[25:]
    with torch.no_grad():
        whole = layer(x, torch.arange(40), [25, 15], None)
        cache = LinearState(2)
        parts = [layer(torch.cat([first[:10], second[:3]]), torch.arange(13), [10, 3], cache)]
        parts.append(
            layer(torch.cat([first[10:22], second[3:4]]), torch.arange(13), [12, 1], cache)
        )
        for t in range(3):
            rows = [first[22 + t : 23 + t]] + ([second[4 + t : 5 + t]] if t < 2 else [])
            parts.append(layer(torch.cat(rows), torch.arange(len(rows)), [1, len(rows) - 1], cache))
    got_first = torch.cat([parts[0][:10], parts[1][:12]] + [p[:1] for p in parts[2:]])
    got_second = torch.cat([parts[0][10:], parts[1][12:]] + [p[1:] for p in parts[2:]])
    torch.testing.assert_close(got_first, whole[:25], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got_second, whole[25:31], atol=1e-10, rtol=1e-10)
    assert cache.state is not None and cache.state.shape == (2, layer.heads, 8, 8)


def test_init_from_attention_repeats_kv_heads() -> None:
    config = tiny_config()  # 6 query heads over 2 KV heads
    teacher = LlamaAttention(config)
    layer = GatedDeltaNet(config)
    init_from_attention(layer, teacher)
    assert torch.equal(layer.q_proj.weight, teacher.q_proj.weight)
    assert torch.equal(layer.o_proj.weight, teacher.o_proj.weight)
    hd, group = config.head_dim, 3
    for h in range(config.num_attention_heads):
        kv = h // group
        rows, teacher_rows = slice(h * hd, (h + 1) * hd), slice(kv * hd, (kv + 1) * hd)
        assert torch.equal(layer.k_proj.weight[rows], teacher.k_proj.weight[teacher_rows])
        assert torch.equal(layer.v_proj.weight[rows], teacher.v_proj.weight[teacher_rows])
    decay = layer.A_log.exp()
    assert ((decay > 0) & (decay <= 16)).all() and (F.softplus(layer.dt_bias) < 0.11).all()
