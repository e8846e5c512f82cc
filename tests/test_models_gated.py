"""SDT/STT reference models: skipped tokens cost nothing, decoding matches, gradients reach g."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from subjective.model_registry.cache import GateState
from subjective.model_registry.convert import build_model
from subjective.model_registry.flops import count_flops
from subjective.model_registry.llama import ForwardContext
from subjective.model_registry.surprise import (
    SurpriseGate,
    causal_moving_average,
    mean_squared_norm,
    topk_mask,
)
from subjective.model_registry.tiny import tiny_config

VOCAB = 101


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def model_for(kind: str, layers: int = 4, seed: int = 0):
    """`kind` is dense, sdt, stt, or sdt-gate (SDT thresholding g instead of a router)."""
    torch.manual_seed(seed)
    kind, _, score = kind.partition("-")
    config = tiny_config(kind, layers=layers, score="gate" if score else "router")
    model = build_model(config).eval()
    if score:  # spread g over (0, 1) so that thresholds split the tokens
        for module in model.modules():
            if isinstance(module, SurpriseGate):
                module.set_beta(8.0, 8.0)
    return model


def threshold_for(kind: str) -> float:
    """A threshold that splits the tokens: g of the tiny models sits near 0.75."""
    return 0.745 if kind.endswith("gate") else 0.5


# --- surprise gate --------------------------------------------------------------------------


def test_gate_formula() -> None:
    gate = SurpriseGate(o_ce=1.3, m_cu=0.9, beta_ce=2.0, beta_cu=0.5)
    d_st, d_ch, ma = torch.tensor([0.2, 1.5]), torch.tensor([0.4, 0.1]), torch.tensor([0.3, 1.0])
    s_ce = torch.sigmoid(2.0 * (d_st - (d_ch - math.log(1.3))))
    s_cu = torch.sigmoid(0.5 * (d_st - 0.9 * ma))
    torch.testing.assert_close(gate(d_st, d_ch, ma), s_ce + s_cu - s_ce * s_cu)
    x = torch.randn(5, 12)
    torch.testing.assert_close(mean_squared_norm(x), x.pow(2).mean(-1))


def test_moving_average_is_causal_and_chunkable() -> None:
    values = torch.rand(11)
    full = causal_moving_average(values, [11], window=4)
    for t in range(11):
        earlier = values[max(0, t - 4) : t]
        expected = earlier.mean() if t else values[0]
        torch.testing.assert_close(full[t], expected)
    state = GateState([None], [None])
    parts = [
        causal_moving_average(values[a:b], [b - a], 4, state) for a, b in [(0, 5), (5, 6), (6, 11)]
    ]
    torch.testing.assert_close(torch.cat(parts), full)


def test_topk_mask_counts_per_row() -> None:
    scores = torch.rand(3, 9)
    valid = torch.ones(3, 9, dtype=torch.bool)
    valid[1, 5:] = False
    mask = topk_mask(scores, valid, 0.34)
    assert mask.sum(1).tolist() == [4, 2, 4]
    assert not (mask & ~valid).any()
    assert scores[0][mask[0]].min() >= scores[0][~mask[0]].max()


# --- skipped tokens: no KV entry, never attended --------------------------------------------


def layer_context(valid: torch.Tensor, selected: torch.Tensor, layer: int) -> ForwardContext:
    batch, length = valid.shape
    return ForwardContext(
        valid=valid,
        positions=torch.arange(length).expand(batch, length),
        cache=None,
        topk=False,
        threshold=torch.full((batch,), 0.5),
        forced_routing={layer: selected},
    )


def skip_path(layer, kind: str, hidden: torch.Tensor, t: int) -> torch.Tensor:
    """What token t of `hidden` `[1, T, d]` must become when the layer skips it: H + prior."""
    with torch.no_grad():
        if kind == "sdt":
            x = hidden[0, t : t + 1]
            return x + layer.prior(layer.prior_norm(x))
        prev = hidden[0, t - 1 : t]
        return hidden[0, t : t + 1] + layer.transition(layer.transition_norm(prev))


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_skipped_token_is_not_attended(kind: str) -> None:
    model = model_for(kind)
    layer = model.model.layers[1]
    torch.manual_seed(5)
    h = torch.randn(1, 10, 48)
    valid = torch.ones(1, 10, dtype=torch.bool)
    selected = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0, 1, 1]], dtype=torch.bool)

    def run(hidden: torch.Tensor) -> torch.Tensor:
        ctx = layer_context(valid, selected, 1)
        with torch.no_grad():
            return layer(hidden, ctx)

    base = run(h)
    skipped = 4
    perturbed = h.clone()
    perturbed[0, skipped] += 3.0
    out = run(perturbed)
    # STT's transition reads x_{t-1}: token 5 (skipped too) predicts from the perturbed token 4.
    unchanged = torch.arange(10) != skipped
    if kind == "stt":
        unchanged[skipped + 1] = False
        torch.testing.assert_close(out[0, 5:6], skip_path(layer, kind, perturbed, 5))
    assert torch.equal(out[0, unchanged], base[0, unchanged])
    # A skipped token takes the prior's predicted update: H + prior(H), nothing else.
    torch.testing.assert_close(out[0, skipped : skipped + 1], skip_path(layer, kind, perturbed, 4))
    assert not torch.equal(out[0, skipped], perturbed[0, skipped]), "the prior adds an update"
    # Control: perturbing a selected token does change the later selected tokens.
    control = h.clone()
    control[0, 2] += 3.0
    changed = (run(control)[0] - base[0]).abs().amax(-1) > 1e-6
    assert changed[[3, 6, 8, 9]].all()
    assert not changed[[0, 1, 4, 5, 7]].any()


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_cache_holds_only_kept_entries(kind: str) -> None:
    model = model_for(kind)
    ids = ids_for(2, 14, seed=1)
    valid = torch.ones(2, 14, dtype=torch.bool)
    valid[1, 9:] = False  # right padding
    cache = model.new_cache(2)
    with torch.no_grad():
        out = model(ids, valid=valid, cache=cache)
    kept = cache.kept_lengths()
    for layer in range(4):
        if layer in out.routing:
            expected = out.routing[layer].sum(1)
            assert 0 < expected.sum() < valid.sum(), "test needs a layer that skips some tokens"
            stored = cache.layers[layer].positions
            for b in range(2):
                assert stored[b].tolist() == out.routing[layer][b].nonzero().flatten().tolist()
        else:
            expected = valid.sum(1)
        assert kept[layer].tolist() == expected.tolist()
    assert cache.seq_lens.tolist() == [14, 9]


# --- incremental decoding == full forward with the same decisions ----------------------------


@pytest.mark.parametrize("kind", ["sdt", "stt", "sdt-gate"])
def test_decode_equals_full_forward(kind: str) -> None:
    # float64: any difference beyond rounding (a leaked token, a wrong position) would show.
    model = model_for(kind, seed=2).double()
    ids = ids_for(2, 15, seed=3)
    prompt = 8
    cache = model.new_cache(2)
    with torch.no_grad():
        thr = threshold_for(kind)
        first = model(ids[:, :prompt], cache=cache, threshold=thr)
        logits, routing = [first.logits], [first.routing]
        for t in range(prompt, 15):
            step = model(ids[:, t : t + 1], cache=cache, threshold=thr)
            logits.append(step.logits)
            routing.append(step.routing)
        decided = {layer: torch.cat([r[layer] for r in routing], 1) for layer in routing[0]}
        full = model(ids, routing=decided, threshold=thr)
        free = model(ids, threshold=thr)
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-10, rtol=1e-12)
    for layer, mask in decided.items():
        assert torch.equal(full.routing[layer], mask)
        # Left to decide by itself, the full forward takes the same decisions (no tie here).
        assert torch.equal(free.routing[layer], mask)
        assert 0 < mask.sum() < mask.numel()
    assert cache.kept_lengths()[1].tolist() == decided[1].sum(1).tolist()


# --- gradients reach the gate -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sdt", "stt"])
def test_lm_loss_reaches_gate_parameters(kind: str) -> None:
    model = model_for(kind, seed=4).train()
    ids = ids_for(2, 12, seed=5)
    out = model(ids)
    lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    lm.backward(retain_graph=True)
    named = dict(model.named_parameters())
    for name in ("surprise.o_ce", "surprise.m_cu"):
        grads = [p.grad for n, p in named.items() if n.endswith(name)]
        assert grads and all(g is not None and g.abs() > 0 for g in grads), name
    adapter = "prior" if kind == "sdt" else "transition"
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in named.items() if adapter in n
    )
    # Routers learn from their BCE against the Top-K choice (their input is detached).
    assert all(p.grad is None for n, p in named.items() if "router" in n)
    model.zero_grad()
    out.aux["router_bce"].backward()
    routers = [p.grad for n, p in named.items() if "router" in n]
    assert routers and all(g is not None and g.abs().sum() > 0 for g in routers)
    expected = {
        "sdt": {"prior_mse", "router_bce"},
        "stt": {"transition_mse", "router_bce", "gate_mean"},
    }
    assert set(out.aux) == expected[kind]


def test_training_uses_capacity() -> None:
    torch.manual_seed(6)
    model = build_model(tiny_config("sdt", capacity=0.25)).train()
    out = model(ids_for(3, 16, seed=6))
    for mask in out.routing.values():
        # ceil(0.25 · 16) = 4 by g, plus the 4 sink positions where g did not pick them.
        assert ((mask[:, 4:].sum(1) + 4) >= 4).all() and mask[:, :4].all()
        assert (mask.sum(1) <= 8).all()


# --- runtime threshold ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sdt", "stt", "sdt-gate"])
def test_higher_threshold_never_executes_more(kind: str) -> None:
    """A higher threshold never selects a new token nor executes more FLOPs: one gated layer.

    Guaranteed only there: the layer's scores do not depend on the threshold. With several gated
    layers a routing change in one changes the inputs (so the scores) of the later ones, and no
    such guarantee holds; `benchmarks/gating_frontier.py` measures it on the shipped models over
    validation blocks (`threshold_monotonicity` in its results).
    """
    model = model_for(kind, layers=2, seed=7)
    ids = ids_for(2, 20, seed=8)
    config = model.config
    previous_flops, previous_mask = None, None
    seen = set()
    low, high = (0.6, 0.8) if kind.endswith("gate") else (0.0, 1.0)
    for threshold in torch.linspace(low, high, 21).tolist():
        with torch.no_grad():
            out = model(ids, threshold=threshold)
        mask = out.routing[1]
        seen.add(int(mask.sum()))
        flops = count_flops(config, out.routing, torch.tensor([20, 20]), torch.tensor([20, 20]))
        total = flops.prompt.flops
        if previous_flops is not None:
            assert (total <= previous_flops).all()
            assert not (mask & ~previous_mask).any()
        previous_flops, previous_mask = total, mask
    assert len(seen) > 3, "the sweep should exercise several selection sizes"


def test_per_sequence_threshold() -> None:
    model = model_for("sdt", seed=9)
    ids = ids_for(1, 16, seed=9).expand(2, 16)
    with torch.no_grad():
        out = model(ids, threshold=torch.tensor([0.0, 1.01]))
    for mask in out.routing.values():
        assert mask[0].all() and not mask[1, 4:].any()  # the 4 sink positions stay


@pytest.mark.parametrize("kind", ["sdt", "stt", "sdt-gate"])
def test_every_token_kept_is_the_dense_model(kind: str) -> None:
    """Every token on the full path: the gated model is exactly its dense base (kept tokens add
    their block output unscaled, whatever g is)."""
    model = model_for(kind, seed=10)
    dense = build_model(tiny_config("dense"))
    dense.load_state_dict(model.state_dict(), strict=False)
    ids = ids_for(2, 11, seed=11)
    cache = model.new_cache(2)
    with torch.no_grad():
        out = model(ids, threshold=0.0, cache=cache)
        expected = dense.eval()(ids).logits
    for mask in out.routing.values():
        assert mask.all()
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=1e-6)
    assert cache.kept_lengths().tolist() == [[11, 11]] * 4


@pytest.mark.parametrize("kind", ["sdt", "stt", "sdt-gate"])
def test_sink_tokens_always_take_the_full_path(kind: str) -> None:
    """A threshold no score passes keeps exactly the first `sink_tokens` positions."""
    model = model_for(kind, seed=12)
    assert model.config.routing.sink_tokens == 4
    ids = ids_for(2, 9, seed=12)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 3:] = False  # a sequence shorter than the sinks keeps what it has
    cache = model.new_cache(2)
    with torch.no_grad():
        first = model(ids[:, :6], valid=valid[:, :6], cache=cache, threshold=1.01)
        # Decoding continues past the sinks: nothing more is kept.
        later = model(ids[:, 6:], valid=valid[:, 6:], cache=cache, threshold=1.01)
    for layer, mask in first.routing.items():
        assert mask[0].tolist() == [True] * 4 + [False] * 2
        assert mask[1].tolist() == [True] * 3 + [False] * 3
        assert not later.routing[layer].any()
        assert cache.kept_lengths()[layer].tolist() == [4, 3]
    # Training's Top-K keeps the sinks too, beside its ceil(γ·T) choices.
    model.train()
    out = model(ids_for(3, 16, seed=13))
    for mask in out.routing.values():
        assert mask[:, :4].all()
