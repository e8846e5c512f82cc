"""The plain-PyTorch Llama matches transformers' LlamaForCausalLM, loaded by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig
from transformers import LlamaForCausalLM as HFLlama

from subjective.model_registry.convert import load_model
from subjective.model_registry.llama import LlamaForCausalLM

REAL_MODEL = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[HFLlama, Path]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    model = HFLlama(config).eval()
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    return model, folder


def test_tiny_logits_equal_transformers(tiny_hf) -> None:
    hf, folder = tiny_hf
    ours = LlamaForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # The generic loader reads the same folder as a dense model.
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder)(ids).logits, expected, atol=1e-5, rtol=0)


def test_tiny_cached_decode_equals_transformers(tiny_hf) -> None:
    hf, folder = tiny_hf
    ours = LlamaForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    cache = ours.new_cache(1)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        steps = [ours(ids[:, :6], cache=cache).logits]
        steps += [ours(ids[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=0)
    assert cache.kept_lengths().tolist() == [[10]] * 3


def test_untied_head_loads(tmp_path) -> None:
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    hf = HFLlama(config).eval()
    hf.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is not ours.model.embed_tokens.weight
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.skipif(not (REAL_MODEL / "model.safetensors").is_file(), reason="no SmolLM2 folder")
def test_smollm2_logits_equal_transformers() -> None:
    hf = HFLlama.from_pretrained(REAL_MODEL, dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_pretrained(REAL_MODEL)
    ids = torch.randint(
        0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4)
    )
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    # 30 layers in float32 with logits up to ~30: summation order differs slightly from HF's.
    torch.testing.assert_close(got, expected, atol=3e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
