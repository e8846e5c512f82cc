"""Hybrid models: linear layers initialised from the teacher, incremental decoding with KV for
softmax layers and a recurrent state for linear ones, save and load by name."""

from __future__ import annotations

import json

import pytest
import torch

from subjective.evaluation.compute import ComputeTotals, metered_logits_fn
from subjective.model_registry.convert import build_model, load_model, save_model
from subjective.model_registry.gated_deltanet import GatedDeltaNet
from subjective.model_registry.hybrid import HybridForCausalLM, hybridize
from subjective.model_registry.tiny import tiny_config

LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]


@pytest.fixture(scope="module")
def teacher_and_hybrid():
    torch.manual_seed(0)
    teacher = build_model(tiny_config(layers=4)).eval()
    return teacher, hybridize(teacher, LAYER_TYPES)


def test_hybridize_copies_the_teacher(teacher_and_hybrid) -> None:
    teacher, hybrid = teacher_and_hybrid
    assert isinstance(hybrid, HybridForCausalLM) and hybrid.config.kind == "hybrid"
    assert hybrid.config.linear_layers == [0, 2, 3]
    for i, layer in enumerate(hybrid.model.layers):
        assert isinstance(layer.self_attn, GatedDeltaNet) == (i != 1)
        source = teacher.model.layers[i]
        assert torch.equal(layer.mlp.up_proj.weight, source.mlp.up_proj.weight)
        assert torch.equal(layer.self_attn.q_proj.weight, source.self_attn.q_proj.weight)
    assert torch.equal(hybrid.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    ids = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert not torch.allclose(hybrid(ids).logits, teacher(ids).logits, atol=1e-3)


def test_incremental_decoding_equals_full_forward(teacher_and_hybrid) -> None:
    _, hybrid = teacher_and_hybrid
    ids = torch.randint(0, 101, (3, 80), generator=torch.Generator().manual_seed(1))
    prompt_lens = torch.tensor([70, 9, 66])  # two prompts cross the 64-token chunk boundary
    with torch.no_grad():
        expected = hybrid(ids).logits
        width = int(prompt_lens.max())
        valid = torch.arange(width)[None, :] < prompt_lens[:, None]
        cache = hybrid.new_cache(3)
        prefill = hybrid(ids[:, :width], valid=valid, cache=cache).logits
        steps = [
            hybrid(ids[torch.arange(3), prompt_lens + s][:, None], cache=cache, logits="last")
            for s in range(6)
        ]
    for b, p in enumerate(prompt_lens.tolist()):
        torch.testing.assert_close(prefill[b, :p], expected[b, :p], atol=1e-5, rtol=1e-5)
        for s, step in enumerate(steps):
            torch.testing.assert_close(step.logits[b], expected[b, p + s], atol=1e-5, rtol=1e-5)
    kept = cache.kept_lengths()
    assert kept[1].tolist() == (prompt_lens + 6).tolist()
    assert kept[[0, 2, 3]].sum() == 0, "linear layers keep no KV entries"
    for i in (0, 2, 3):
        assert cache.layers[i].state.shape == (3, 6, 8, 8)


def test_save_and_load(teacher_and_hybrid, tmp_path) -> None:
    _, hybrid = teacher_and_hybrid
    folder = save_model(hybrid, tmp_path / "hybrid", base_folder=None)
    raw = json.loads((folder / "config.json").read_text())
    assert raw["architectures"] == ["SubjectiveHybridForCausalLM"]
    assert raw["layer_types"] == LAYER_TYPES and "routing" not in raw
    assert not (folder / "routing_adapter.safetensors").exists()
    loaded = load_model(folder)
    assert isinstance(loaded, HybridForCausalLM)
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hybrid(ids).logits)
    with pytest.raises(ValueError, match="full weights"):
        save_model(hybrid, tmp_path / "adapter", base_folder=tmp_path)


def test_metered_perplexity_counts_no_kv_in_linear_layers(teacher_and_hybrid) -> None:
    _, hybrid = teacher_and_hybrid
    totals = ComputeTotals(hybrid.config)
    logits = metered_logits_fn(hybrid, None, totals)
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(logits(ids), hybrid(ids).logits)
    summary = totals.summary()
    assert summary["kv_reduction_total"] == pytest.approx(3 / 4)
    assert summary["kv_reduction_gated"] == 1.0
