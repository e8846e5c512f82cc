"""The meter (`count_flops`) against torch's FLOP counter on the real forward, and by hand."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from subjective.model_registry.config import ModelConfig, RoutingConfig
from subjective.model_registry.convert import build_model
from subjective.model_registry.delta_rule import CHUNK_SIZE
from subjective.model_registry.flops import (
    PhaseCounts,
    count_flops,
    sequence_memory_bytes,
    state_elements,
)
from subjective.model_registry.hybrid import hybridize
from subjective.model_registry.surprise import SurpriseGate
from subjective.model_registry.tiny import tiny_config


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def run_request(model, ids, prompt_lens, new_tokens, threshold=0.5):
    """Prefill (ragged, right-padded) then decode; torch's count per phase, decisions, lengths."""
    batch = ids.shape[0]
    width = int(prompt_lens.max())
    valid = torch.arange(width)[None, :] < prompt_lens[:, None]
    cache = model.new_cache(batch)
    outputs = []
    prompt_flops = counted(
        lambda: outputs.append(
            model(ids[:, :width], valid=valid, cache=cache, threshold=threshold, logits="last")
        )
    )
    # Decode: token t of each sequence continues right after its own prompt.
    steps = [ids[torch.arange(batch), prompt_lens + s][:, None] for s in range(new_tokens)]
    completion_flops = counted(
        lambda: outputs.extend(
            model(step, cache=cache, threshold=threshold, logits="last") for step in steps
        )
    )
    lengths = prompt_lens + new_tokens
    routing = {}
    for layer in outputs[0].routing:
        full = torch.zeros(batch, int(lengths.max()), dtype=torch.bool)
        for b in range(batch):
            p = int(prompt_lens[b])
            full[b, :p] = outputs[0].routing[layer][b, :p]
            for s in range(new_tokens):
                full[b, p + s] = outputs[1 + s].routing[layer][b, 0]
        routing[layer] = full
    return prompt_flops, completion_flops, routing, lengths, cache


def masked_pairs(config: ModelConfig, routing, prompt_lens) -> int:
    """Score pairs the reference prefill computes then masks: `n·(n-1)/2` per layer and row."""
    total = 0
    for layer in range(config.num_hidden_layers):
        for b, p in enumerate(prompt_lens.tolist()):
            n = int(routing[layer][b, :p].sum()) if layer in routing else p
            total += n * (n - 1) // 2
    return total


@pytest.mark.parametrize("kind", ["dense", "sdt", "stt", "sdt-gate"])
def test_meter_equals_torch_flop_counter(kind: str) -> None:
    torch.manual_seed(11)
    kind, _, score = kind.partition("-")
    config = tiny_config(kind, layers=4, score="gate" if score else "router")
    model = build_model(config).eval()
    for module in model.modules():
        if isinstance(module, SurpriseGate):
            module.set_beta(8.0, 8.0)  # spread g so that the threshold splits the tokens
    ids = torch.randint(0, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    prompt_lens = torch.tensor([9, 13, 6])
    prompt_flops, completion_flops, routing, lengths, cache = run_request(
        model, ids, prompt_lens, new_tokens=5, threshold=0.745 if score else 0.5
    )
    report = count_flops(config, routing, lengths, prompt_lens)
    residual = 2 * 2 * config.num_attention_heads * config.head_dim
    residual *= masked_pairs(config, routing, prompt_lens)
    assert prompt_flops == int(report.prompt.flops.sum()) + residual
    # Decode: one query attends every kept entry, nothing is masked.
    assert completion_flops == int(report.completion.flops.sum())
    # KV entries: what the cache actually holds.
    kv = report.prompt.kv_entries + report.completion.kv_entries
    assert kv.tolist() == cache.kept_lengths().sum(0).tolist()
    assert (report.prompt.kv_entries_dense == prompt_lens * config.num_hidden_layers).all()
    if kind == "dense":
        assert torch.equal(report.prompt.flops, report.prompt.dense_flops)
        assert torch.equal(report.completion.flops, report.completion.dense_flops)
    else:
        for mask in routing.values():
            assert 0 < mask.sum() < lengths.sum(), "routing should skip some tokens"
        completion = report.completion
        assert (completion.kv_entries <= completion.kv_entries_dense).all()
        assert completion.kv_entries.sum() < completion.kv_entries_dense.sum()


def test_meter_equals_counter_per_sequence() -> None:
    torch.manual_seed(12)
    config = tiny_config("sdt", layers=4)
    model = build_model(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    prompt_lens = torch.tensor([11])
    prompt_flops, completion_flops, routing, lengths, _ = run_request(model, ids, prompt_lens, 4)
    report = count_flops(config, routing, lengths, prompt_lens)
    residual = 4 * config.num_attention_heads * config.head_dim
    assert prompt_flops == int(report.prompt.flops[0]) + residual * masked_pairs(
        config, routing, prompt_lens
    )
    assert completion_flops == int(report.completion.flops[0])
    usage = report.usage(0)
    assert usage["flops"] == int(report.prompt.flops[0] + report.completion.flops[0])
    assert 0 < usage["saved_ratio"] < 1


def test_hand_count_sdt_pair() -> None:
    """A 2-layer SDT toy (one Decision + one Dynamic layer) counted by hand."""
    d, heads, kv_heads, hd, inter, vocab, prior = 8, 2, 1, 4, 16, 10, 2
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hd,
        routing=RoutingConfig(kind="sdt", decision_layers=[0], gated_layers=[1], prior_width=prior),
    )
    # 4 prompt tokens + 2 completion tokens; Dynamic layer keeps tokens 0, 2, 5.
    routing = {1: torch.tensor([[True, False, True, False, False, True]])}
    report = count_flops(config, routing, torch.tensor([6]), torch.tensor([4]))
    proj = 2 * d * heads * hd + 2 * 2 * d * kv_heads * hd + 2 * heads * hd * d  # 128+128+128
    mlp = 3 * 2 * d * inter  # 768
    att = 4 * heads * hd  # per attended entry: 32
    skip_prior = 3 * 2 * d * prior  # 96: the Dynamic layer's prior, on skipped tokens only
    router = 2 * d  # 16
    head = 2 * d * vocab  # 160
    # Prompt: decision layer (dense: routing by router, no g computed), tokens attend 1..4
    # entries; dynamic: token 0 (1), token 2 (2) kept, tokens 1 and 3 take the prior.
    prompt = 4 * (proj + mlp) + att * (1 + 2 + 3 + 4)
    prompt += 4 * router + 2 * (proj + mlp) + att * (1 + 2) + 2 * skip_prior + head
    completion = 2 * (proj + mlp) + att * (5 + 6)
    completion += 2 * router + (proj + mlp) + att * 3 + skip_prior + 2 * head
    assert int(report.prompt.flops[0]) == prompt
    assert int(report.completion.flops[0]) == completion
    dense_prompt = 2 * 4 * (proj + mlp) + 2 * att * (1 + 2 + 3 + 4) + head
    dense_completion = 2 * 2 * (proj + mlp) + 2 * att * (5 + 6) + 2 * head
    assert int(report.prompt.dense_flops[0]) == dense_prompt
    assert int(report.completion.dense_flops[0]) == dense_completion
    assert int(report.prompt.kv_entries[0]) == 4 + 2
    assert int(report.completion.kv_entries[0]) == 2 + 1
    assert int(report.prompt.kv_entries_dense[0]) == 8
    assert int(report.completion.kv_entries_dense[0]) == 4
    assert int(report.prompt.gated_attention_flops[0]) == att * (1 + 2)
    assert int(report.prompt.gated_attention_flops_dense[0]) == att * (1 + 2 + 3 + 4)
    assert int(report.completion.gated_attention_flops[0]) == att * 3
    assert int(report.completion.gated_attention_flops_dense[0]) == att * (5 + 6)
    all_logits = count_flops(
        config, routing, torch.tensor([6]), torch.tensor([4]), prompt_logits="all"
    )
    assert int(all_logits.prompt.flops[0]) == prompt + 3 * head


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_fewer_full_path_tokens_never_cost_more(kind: str) -> None:
    config = replace(tiny_config(kind, layers=6))
    generator = torch.Generator().manual_seed(3)
    lengths, prompt_lens = torch.tensor([30, 21]), torch.tensor([12, 21])
    for _ in range(20):
        routing = {
            layer: torch.rand(2, 30, generator=generator) < 0.6
            for layer in config.routing.gated_layers
        }
        fewer = {
            layer: mask & (torch.rand(2, 30, generator=generator) < 0.7)
            for layer, mask in routing.items()
        }
        more = count_flops(config, routing, lengths, prompt_lens)
        less = count_flops(config, fewer, lengths, prompt_lens)
        for phase in ("prompt", "completion"):
            a, b = getattr(more, phase), getattr(less, phase)
            assert (b.flops <= a.flops).all() and (b.kv_entries <= a.kv_entries).all()


def test_hand_count_one_temporal_layer() -> None:
    """A 1-layer STT toy whose only layer is temporal, counted by hand."""
    d, heads, hd, inter, vocab, width = 4, 1, 4, 8, 6, 3
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hd,
        routing=RoutingConfig(kind="stt", gated_layers=[0], transition_width=width),
    )
    routing = {0: torch.tensor([[False, True, True]])}  # 2 prompt tokens, 1 completion token
    report = count_flops(config, routing, torch.tensor([3]), torch.tensor([2]))
    full = 4 * 2 * d * d + 3 * 2 * d * inter  # 128 + 192 for a kept token
    transition = 3 * 2 * d * width  # 72: the skip path's prior, for the skipped token 0
    router = 2 * 2 * d  # 16 for every token
    att = 4 * hd  # 16 per attended entry
    head = 2 * d * vocab  # 48
    assert int(report.prompt.flops[0]) == 2 * router + full + transition + att * 1 + head
    assert int(report.completion.flops[0]) == router + full + att * 2 + head
    assert int(report.prompt.dense_flops[0]) == 2 * (128 + 192) + att * (1 + 2) + head
    assert int(report.completion.dense_flops[0]) == 128 + 192 + att * 3 + head
    assert [int(report.prompt.kv_entries[0]), int(report.completion.kv_entries[0])] == [1, 1]


PHASES = ("prompt", "completion")


def window_of(mask: Tensor, starts: Tensor, ends: Tensor) -> Tensor:
    """Columns `starts[b] .. ends[b]-1` of each row, left-aligned (the rest: later columns)."""
    width = max(int((ends - starts).max()), 1)
    columns = (starts[:, None] + torch.arange(width)[None, :]).clamp(max=mask.shape[1] - 1)
    return mask.gather(1, columns)


@pytest.mark.parametrize("kind", ["dense", "sdt", "stt"])
@pytest.mark.parametrize("prompt_logits", ["last", "all"])
def test_consecutive_windows_add_up_to_the_whole_count(kind: str, prompt_logits: str) -> None:
    config = tiny_config(kind, layers=6)
    generator = torch.Generator().manual_seed(7)
    batch, windows = 5, 4
    for _ in range(10):
        lengths = torch.randint(1, 40, (batch,), generator=generator)
        prompt_lens = (torch.rand(batch, generator=generator) * lengths).long() + 1
        width = int(lengths.max())
        routing = {
            layer: torch.rand(batch, width, generator=generator) < 0.5
            for layer in config.routing.gated_layers
        }
        whole = count_flops(config, routing, lengths, prompt_lens, prompt_logits=prompt_logits)
        cuts = (torch.rand(batch, windows - 1, generator=generator) * (lengths[:, None] + 1)).long()
        bounds = torch.cat([torch.zeros(batch, 1, dtype=torch.long), cuts.sort(1).values], 1)
        bounds = torch.cat([bounds, lengths[:, None]], 1)
        summed = {phase: {f.name: 0 for f in fields(PhaseCounts)} for phase in PHASES}
        for k in range(windows):
            starts, ends = bounds[:, k], bounds[:, k + 1]
            report = count_flops(
                config,
                {layer: window_of(mask, starts, ends) for layer, mask in routing.items()},
                ends - starts,
                prompt_lens,
                prompt_logits=prompt_logits,
                starts=starts,
                kept_before={
                    layer: (mask & (torch.arange(width)[None, :] < starts[:, None])).sum(1)
                    for layer, mask in routing.items()
                },
            )
            for phase in PHASES:
                for name, total in summed[phase].items():
                    summed[phase][name] = total + getattr(getattr(report, phase), name)
        for phase in PHASES:
            for name, total in summed[phase].items():
                assert torch.equal(total, getattr(getattr(whole, phase), name)), (phase, name)


def test_hybrid_meter_equals_torch_flop_counter() -> None:
    """Linear layers: decode is the recurrent form (counted exactly); prefill runs the chunked
    form on rows padded to whole chunks, whose padding and unit-triangular solves (not seen by
    torch's counter) make the only difference; no KV entries, a constant state instead."""
    torch.manual_seed(13)
    teacher = build_model(tiny_config("dense", layers=4)).eval()
    model = hybridize(teacher, ["linear_attention", "full_attention"] * 2)
    config = model.config
    ids = torch.randint(0, config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(4))
    prompt_lens = torch.tensor([9, 13, 6])
    prompt_flops, completion_flops, routing, lengths, cache = run_request(
        model, ids, prompt_lens, new_tokens=5
    )
    assert routing == {}
    report = count_flops(config, routing, lengths, prompt_lens)
    assert completion_flops == int(report.completion.flops.sum())

    heads, hd, chunk = config.num_attention_heads, config.head_dim, CHUNK_SIZE
    full_layers = config.num_hidden_layers - len(config.linear_layers)
    masked = full_layers * sum(p * (p - 1) // 2 for p in prompt_lens.tolist())
    padded_tokens = 3 * chunk  # every row padded to the 13-token batch width, then to a chunk
    chunk_matmuls = (6 * hd * hd + 6 * chunk * hd) * heads  # per token the counter sees
    solves = 2 * (chunk - 1) * hd * heads  # per real token, in the meter only
    residual = 4 * heads * hd * masked
    residual += len(config.linear_layers) * (
        (padded_tokens - int(prompt_lens.sum())) * chunk_matmuls - int(prompt_lens.sum()) * solves
    )
    assert prompt_flops == int(report.prompt.flops.sum()) + residual

    kv = report.prompt.kv_entries + report.completion.kv_entries
    assert kv.tolist() == cache.kept_lengths().sum(0).tolist() == (lengths * full_layers).tolist()
    states = [cache.layers[i].state for i in config.linear_layers]
    assert sum(s[0].numel() for s in states) == state_elements(config) > 0
    for b, length in enumerate(lengths.tolist()):  # what the cache really holds, in bytes
        held = sum(s[b].nbytes for s in states)
        for i, layer in enumerate(cache.layers):
            if i not in config.linear_layers:
                held += layer.keys[b].nbytes + layer.values[b].nbytes
        assert held == sequence_memory_bytes(config, length, kv_bytes=4, state_bytes=4)
    dense = count_flops(teacher.config, {}, lengths, prompt_lens)
    assert torch.equal(report.prompt.dense_flops, dense.prompt.flops)
    assert state_elements(teacher.config) == 0
