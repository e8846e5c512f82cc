"""The cheap steps of the gating recipe on tiny models: layer states, stage A, layer ranking."""

from __future__ import annotations

import math

import pytest
import torch

from subjective.model_registry.convert import build_model
from subjective.model_registry.layer_states import collect_layer_states
from subjective.model_registry.llama import LlamaForCausalLM
from subjective.model_registry.sensitivity import choose_layers, rank_layers
from subjective.model_registry.skip_fit import fit_gated_layers, predict
from subjective.model_registry.stt import previous_tokens
from subjective.model_registry.tiny import tiny_config

VOCAB = 101


def ids_for(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_layer_states_are_each_layers_input_and_update() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_config("dense")).eval()
    ids = ids_for(3, 12, seed=1)
    states = collect_layer_states(model, ids, batch_size=2)
    assert len(states.inputs) == 4 and states.blocks == 3
    with torch.no_grad():
        h = model.model.embed_tokens(ids)
        torch.testing.assert_close(states.inputs[0], h)
        for i in range(3):  # layer i's output is layer i+1's input
            torch.testing.assert_close(states.inputs[i] + states.updates[i], states.inputs[i + 1])
        final = model.model.norm(states.inputs[3] + states.updates[3])
        torch.testing.assert_close(model.lm_head(final), model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_stage_a_fits_the_prior_and_calibrates_the_router(kind: str) -> None:
    """The fitted prior misses less of the update than a fresh one; the router keeps about γ
    of the non-sink tokens at the base threshold, mostly the ones the prior misses."""
    torch.manual_seed(2)
    model = build_model(tiny_config(kind)).eval()
    dense = build_model(tiny_config("dense")).eval()
    dense.load_state_dict(model.state_dict(), strict=False)
    states = collect_layer_states(dense, ids_for(8, 40, seed=3))
    sinks = model.config.routing.sink_tokens

    def relative_miss(index: int) -> float:
        layer = model.model.layers[index]
        x, update = states.inputs[index], states.updates[index]
        with torch.no_grad():
            miss = (update - predict(layer, x, previous_tokens(x)))[:, sinks:]
        return float(miss.pow(2).sum() / update[:, sinks:].pow(2).sum())

    gated = model.config.routing.gated_layers
    before = {i: relative_miss(i) for i in gated}
    fits = fit_gated_layers(model, states, steps=150, progress=False)
    assert [f["layer"] for f in fits] == gated
    for fit in fits:
        after = relative_miss(fit["layer"])
        assert after < 0.9 * before[fit["layer"]]
        assert math.isclose(after, fit["prior_relative_mse"], rel_tol=1e-4)
        assert abs(fit["kept_share"] - 0.5) < 0.02
        assert fit["router_recall"] > 0.5  # better than a coin at the same share
    # The calibrated model, run as inference routes, keeps about γ beyond the sinks.
    with torch.no_grad():
        out = model(ids_for(8, 40, seed=3))
    for mask in out.routing.values():
        assert abs(float(mask[:, sinks:].float().mean()) - 0.5) < 0.05


def plant_sensitive_layer(model: LlamaForCausalLM, index: int) -> None:
    """Make layer `index` write a large, token-specific update no cheap prior can predict."""
    layer = model.model.layers[index]
    with torch.no_grad():
        layer.mlp.down_proj.weight.mul_(40.0)
        layer.self_attn.o_proj.weight.mul_(40.0)


def test_rank_layers_puts_a_planted_sensitive_layer_last() -> None:
    torch.manual_seed(4)
    model = build_model(tiny_config("dense", layers=5)).eval()
    plant_sensitive_layer(model, 2)
    states = collect_layer_states(model, ids_for(8, 32, seed=5))
    ranking = rank_layers(model, states, ids_for(4, 32, seed=6), 0.5, progress=False)
    assert sorted(r.layer for r in ranking) == list(range(5))
    assert [r.kl for r in ranking] == sorted(r.kl for r in ranking)
    assert ranking[-1].layer == 2, ranking
    assert ranking[-1].kl > 3 * ranking[-2].kl


def test_choose_layers_respects_sdt_decision_layers() -> None:
    ranking = [{"layer": i, "kl": kl} for i, kl in enumerate([0.0, 0.1, 0.2, 0.15, 0.9, 0.3])]
    assert choose_layers(ranking, 3, "stt") == [0, 1, 3]
    # SDT: no layer 0 (it needs a Decision layer before it), never two adjacent layers.
    assert choose_layers(ranking, 2, "sdt") == [1, 3]
    assert choose_layers(ranking, 3, "sdt") == [1, 3, 5]
    with pytest.raises(ValueError, match="allows only 3"):
        choose_layers(ranking, 4, "sdt")
