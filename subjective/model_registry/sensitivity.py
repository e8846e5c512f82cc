"""Which layers tolerate skipping: KL(dense ‖ gated) with one layer gated at a time.

For each layer i of a dense model (the second seed's KL-guided selection, applied to gating):
fit a linear skip-path prior `RMSNorm(x_t) · W` to that layer's updates on calibration text
(least squares, closed form: a stand-in for the narrow SwiGLU prior the gated layer trains,
seconds instead of minutes per layer), let it skip the share `1 - γ` of the non-sink tokens
its prior predicts best (the tokens an ideal router would skip; the sink tokens always run),
kept tokens attending only to kept tokens, and measure the mean per-token KL divergence of the
next-token distributions from the dense model's on held-out calibration blocks. Lower KL: the
layer matters less, gate it first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from subjective.model_registry.distil import forward_kl
from subjective.model_registry.layer_states import LayerStates, collect_layer_states
from subjective.model_registry.llama import ForwardContext, LlamaForCausalLM, counts_of
from subjective.model_registry.skip_fit import top_share


@dataclass
class LayerSensitivity:
    layer: int
    kl: float  # mean KL(dense ‖ gated) per predicted token, nats
    prior_relative_mse: float


class LinearPrior:
    """`x ↦ RMSNorm(x) · W`, W fitted by ridge-regularised least squares."""

    def __init__(self, x: Tensor, target: Tensor, eps: float, ridge: float = 1e-3) -> None:
        self.eps = eps
        features = self.features(x).double()
        gram = features.T @ features
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        self.weight = torch.linalg.solve(gram, features.T @ target.double()).float()

    def features(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(self, x: Tensor) -> Tensor:
        return self.features(x) @ self.weight


@torch.no_grad()
def gated_logits(
    model: LlamaForCausalLM, index: int, prior: LinearPrior, h: Tensor, capacity: float, sinks: int
) -> Tensor:
    """Logits of the dense `model` from `h`, the input of layer `index` `[B, T, d]`, on, with
    that layer gated by its prior's miss (the earlier layers are dense: not rerun)."""
    batch, length, _ = h.shape
    valid = torch.ones(batch, length, dtype=torch.bool)
    positions = torch.arange(length).expand(batch, length)
    ctx = ForwardContext(valid, positions, None, False, torch.zeros(batch))
    layer = model.model.layers[index]
    update = layer.run_dense(h, ctx, None).view_as(h) - h
    miss = (update - prior(h)).pow(2).sum(-1)
    kept = torch.ones_like(valid)
    kept[:, sinks:] = top_share(miss[:, sinks:], capacity)
    x = h[kept]
    attn, mlp = layer.block(x, positions[kept], counts_of(kept), None)
    out = h.clone()
    out[kept] = (x + attn) + mlp
    out[~kept] = h[~kept] + prior(h[~kept])
    for later in model.model.layers[index + 1 :]:
        out = later(out, ctx)
    return model.lm_head(model.model.norm(out))


def rank_layers(
    model: LlamaForCausalLM,
    fit_states: LayerStates,
    eval_ids: Tensor,
    capacity: float,
    sinks: int = 4,
    progress: bool = True,
) -> list[LayerSensitivity]:
    """Every layer's sensitivity (fit on `fit_states`, KL on `eval_ids`), least first."""
    from tqdm import tqdm

    with torch.no_grad():
        reference = model(eval_ids, logits="all").logits
    eval_states = collect_layer_states(model, eval_ids)
    results = []
    layers = range(model.config.num_hidden_layers)
    for index in tqdm(layers, desc="rank layers", disable=not progress):
        x = fit_states.inputs[index][:, sinks:].reshape(-1, model.config.hidden_size)
        target = fit_states.updates[index][:, sinks:].reshape(x.shape)
        prior = LinearPrior(x, target, model.config.rms_norm_eps)
        miss = (target - prior(x)).pow(2).sum() / target.pow(2).sum()
        logits = gated_logits(model, index, prior, eval_states.inputs[index], capacity, sinks)
        results.append(LayerSensitivity(index, float(forward_kl(reference, logits)), float(miss)))
    return sorted(results, key=lambda r: r.kl)


def choose_layers(ranking: list[dict], count: int, kind: str) -> list[int]:
    """The `count` least sensitive layers of a saved ranking (`[{"layer", "kl"}]`); SDT also
    needs a Decision layer before each: no layer 0, no two chosen layers adjacent."""
    chosen: list[int] = []
    for entry in sorted(ranking, key=lambda r: r["kl"]):
        layer = int(entry["layer"])
        if kind == "sdt" and (layer == 0 or layer - 1 in chosen or layer + 1 in chosen):
            continue
        chosen.append(layer)
        if len(chosen) == count:
            return sorted(chosen)
    raise ValueError(f"the ranking allows only {len(chosen)} {kind} gated layers, not {count}")


def plot_ranking(results: list[dict], capacity: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(results, key=lambda r: r["layer"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar([r["layer"] for r in ordered], [r["kl"] for r in ordered], color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("layer gated alone")
    ax.set_ylabel("KL(dense ‖ gated), nats/token")
    ax.set_title(f"Layer sensitivity to skipping at γ = {capacity} (lower: gate first)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
