"""The thin generation loop: decisions, tokens and the meter agree with independent checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from subjective.model_registry.convert import build_model
from subjective.model_registry.runner import generate
from subjective.model_registry.tiny import tiny_config

PROMPTS = [[5, 17, 3, 99, 42, 7, 8], [11, 12], [60, 61, 62, 63, 64]]


@pytest.mark.parametrize("kind", ["dense", "sdt", "stt"])
def test_generation_matches_full_forward_and_meter(kind: str) -> None:
    torch.manual_seed(21)
    config = tiny_config(kind)
    model = build_model(config).double().eval()
    with FlopCounterMode(display=False) as counter:
        result = generate(model, PROMPTS, max_new_tokens=6)
    assert [len(t) for t in result.tokens] == [6, 6, 6]
    assert result.lengths.tolist() == [len(p) + 5 for p in PROMPTS]
    # Each sequence alone, full forward with the same decisions, predicts the same tokens.
    for b, prompt in enumerate(PROMPTS):
        ids = torch.tensor([prompt + result.tokens[b][:-1]])
        n = ids.shape[1]
        forced = {layer: mask[b : b + 1, :n] for layer, mask in result.routing.items()}
        with torch.no_grad():
            logits = model(ids, routing=forced).logits
        assert logits[0, len(prompt) - 1 :].argmax(-1).tolist() == result.tokens[b]
    # The meter equals torch's count, less the causally masked prefill pairs (see flops.py).
    masked = 0
    for layer in range(config.num_hidden_layers):
        for b, p in enumerate(result.prompt_lens.tolist()):
            kept = int(result.routing[layer][b, :p].sum()) if layer in result.routing else p
            masked += kept * (kept - 1) // 2
    residual = 4 * config.num_attention_heads * config.head_dim * masked
    metered = int(result.flops.prompt.flops.sum() + result.flops.completion.flops.sum())
    assert counter.get_total_flops() == metered + residual
    if kind != "dense":
        assert any(0 < m.sum() < result.lengths.sum() for m in result.routing.values())


def test_eos_stops_a_sequence() -> None:
    torch.manual_seed(22)
    model = build_model(tiny_config("sdt")).eval()
    first = generate(model, PROMPTS, max_new_tokens=1).tokens[0][0]
    result = generate(model, PROMPTS, max_new_tokens=5, eos_token_id=first)
    assert result.tokens[0] == [first]
    assert result.lengths[0] == len(PROMPTS[0])  # the EOS token is never fed back
    assert result.flops.completion.flops[0] == 0
    for b in (1, 2):
        n = len(result.tokens[b])
        assert result.lengths[b] == len(PROMPTS[b]) + n - 1
