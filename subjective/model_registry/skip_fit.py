"""Stage A of the gating recipe: fit each gated layer's skip-path prior and router on the
frozen dense model's own layer inputs and updates (`layer_states`), then calibrate the router.

Per gated layer:
1. the prior (SDT: `Prior(RMSNorm(x_t))`; STT: the transition `T(RMSNorm(x_{t-1}))`) is fitted
   to the block update `Block(x_t)` by mean squared error;
2. its miss `D_ch = ||Block(x_t) - prior||² / d` marks the tokens that need the block: per
   block of text the top `γ` share of the non-sink tokens (the paper's surprise: where the cheap
   prediction fails);
3. the causal router learns those marks by binary cross-entropy;
4. its bias is shifted so that on the calibration text a share γ of the non-sink tokens passes
   the base threshold (`router probability > threshold`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from subjective.model_registry.layer_states import LayerStates
from subjective.model_registry.llama import LlamaForCausalLM
from subjective.model_registry.sdt import DynamicLayer
from subjective.model_registry.stt import TemporalLayer, previous_tokens


@dataclass
class LayerFit:
    layer: int
    prior_relative_mse: float  # ||Block(x) - prior||² / ||Block(x)||² over non-sink tokens
    router_recall: float  # share of the marked tokens the calibrated router keeps
    kept_share: float  # share of non-sink tokens the calibrated router keeps


def prior_modules(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    if isinstance(layer, DynamicLayer):
        return layer.prior_norm, layer.prior
    if isinstance(layer, TemporalLayer):
        return layer.transition_norm, layer.transition
    raise TypeError(f"{type(layer).__name__} is not a gated layer")


def predict(layer: nn.Module, x: Tensor, prev: Tensor) -> Tensor:
    norm, net = prior_modules(layer)
    return net(norm(prev if isinstance(layer, TemporalLayer) else x))


def router_logits(layer: nn.Module, x: Tensor, prev: Tensor) -> Tensor:
    if isinstance(layer, TemporalLayer):
        features = torch.cat([layer.router_norm(x), layer.router_norm(prev)], dim=-1)
    else:
        features = layer.router_norm(x)
    return layer.router(features).squeeze(-1)


def top_share(miss: Tensor, share: float) -> Tensor:
    """Per row of `[B, T]`, the top `ceil(share · T)` entries (ties to the earlier one)."""
    keep = math.ceil(share * miss.shape[1])
    order = miss.argsort(dim=1, descending=True, stable=True)[:, :keep]
    marks = torch.zeros_like(miss, dtype=torch.bool)
    return marks.scatter_(1, order, True)


def train_steps(
    params: list[nn.Parameter],
    loss_of: Callable[[Tensor], Tensor],
    rows: int,
    steps: int,
    lr: float,
    batch: int,
) -> None:
    """Adam with a cosine schedule over random minibatches of `rows` sample indices."""
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, rows, (min(batch, rows),), generator=generator)
        loss = loss_of(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()


def fit_prior(
    layer: nn.Module, x: Tensor, prev: Tensor, target: Tensor, steps: int, batch: int
) -> Tensor:
    """Fit the layer's prior to `target` `[N, d]`; returns each token's `||target - prior||²`."""
    norm, net = prior_modules(layer)
    with torch.enable_grad():
        train_steps(
            [*norm.parameters(), *net.parameters()],
            lambda i: F.mse_loss(predict(layer, x[i], prev[i]), target[i]),
            x.shape[0],
            steps,
            3e-3,
            batch,
        )
    with torch.no_grad():
        return (target - predict(layer, x, prev)).pow(2).sum(-1)


def fit_router(
    layer: nn.Module,
    x: Tensor,
    prev: Tensor,
    marks: Tensor,
    capacity: float,
    threshold: float,
    steps: int,
    batch: int,
) -> Tensor:
    """Fit the router to `marks` `[N]` (class-balanced BCE), then shift its bias so a share
    `capacity` of the tokens passes `threshold`; returns the calibrated keep mask."""
    positive = marks.mean().clamp(1e-3, 1 - 1e-3)
    with torch.enable_grad():
        train_steps(
            [*layer.router_norm.parameters(), *layer.router.parameters()],
            lambda i: F.binary_cross_entropy_with_logits(
                router_logits(layer, x[i], prev[i]), marks[i], pos_weight=(1 - positive) / positive
            ),
            x.shape[0],
            steps,
            3e-3,
            batch,
        )
    cut = math.log(threshold / (1 - threshold))
    with torch.no_grad():
        logits = router_logits(layer, x, prev)
        layer.router.bias += cut - torch.quantile(logits.double(), 1.0 - capacity).item()
        return router_logits(layer, x, prev) > cut


def sample_rows(inputs: Tensor, updates: Tensor, sink_tokens: int) -> tuple[Tensor, ...]:
    """`(x, x_{t-1}, Block(x))` of the non-sink tokens, each `[B, T - sinks, d]`."""
    prev = previous_tokens(inputs)
    return tuple(t[:, sink_tokens:] for t in (inputs, prev, updates))


def fit_layer(
    layer: nn.Module,
    inputs: Tensor,
    updates: Tensor,
    capacity: float,
    threshold: float,
    sink_tokens: int,
    steps: int = 300,
    batch: int = 512,
) -> LayerFit:
    """Fit one gated layer's prior and router to `inputs`/`updates` `[B, T, d]` (see module)."""
    x, prev, target = sample_rows(inputs, updates, sink_tokens)
    shape = x.shape[:2]
    x, prev, target = (t.reshape(-1, t.shape[-1]) for t in (x, prev, target))
    miss = fit_prior(layer, x, prev, target, steps, batch)
    relative = float(miss.sum() / target.pow(2).sum())
    marks = top_share(miss.view(shape), capacity).flatten()
    kept = fit_router(layer, x, prev, marks.float(), capacity, threshold, steps, batch)
    recall = float((kept & marks).sum() / marks.sum().clamp_min(1))
    return LayerFit(layer.index, relative, recall, float(kept.float().mean()))


def fit_gated_layers(
    model: LlamaForCausalLM, states: LayerStates, steps: int = 300, progress: bool = True
) -> list[dict]:
    """Stage A for every gated layer of an SDT/STT `model` (modified in place, float32), on
    the model's device (each layer's states move there in turn)."""
    routing = model.config.routing
    device = model.lm_head.weight.device
    fits = []
    for index in tqdm(routing.gated_layers, desc="stage A", disable=not progress):
        fit = fit_layer(
            model.model.layers[index],
            states.inputs[index].to(device),
            states.updates[index].to(device),
            routing.capacity,
            routing.threshold,
            routing.sink_tokens,
            steps=steps,
        )
        fits.append(asdict(fit))
    return fits


def fit_folder(
    folder: Path,
    states: LayerStates,
    steps: int = 300,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Stage A on a converted SDT/STT folder (fitted on `device`): fit, rewrite its adapter in
    place (the base stays referenced), and record the fits in `stage_a.json` beside it."""
    from subjective.model_registry.convert import base_folder_of, load_model, save_model

    model = load_model(folder).to(device)
    if model.config.kind == "dense":
        raise ValueError(f"{folder} is dense: convert it first")
    fits = fit_gated_layers(model, states, steps=steps, progress=progress)
    raw = json.loads((folder / "config.json").read_text())
    save_model(model.cpu(), folder, base_folder=base_folder_of(folder), template_config=raw)
    (folder / "stage_a.json").write_text(json.dumps(fits, indent=2) + "\n")
    return fits
