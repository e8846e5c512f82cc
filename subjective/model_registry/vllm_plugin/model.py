"""SDT and STT as vLLM models: vLLM's Llama modules plus the routing adapter, gated forward.

Base weights load through vLLM's own Llama loader (fused QKV, gate/up), the adapter's
parameters by their reference names (`model.layers.N.prior...`); both come from the folder
layout of `convert.py` (base by reference + `routing_adapter.safetensors`). Dense and Decision
layers use vLLM's attention and paged KV as they are; gated layers attend over their compacted
entries (`compact_attention`), in pages sized for the routing capacity γ (`kv_spec`; the
`kv_capacity` hf override changes γ, 1 turns the smaller pages and their cap off). In vLLM's
compiled mode the layers' shape-generic pieces are compiled (`layers.Steps`); routing stays
eager (data-dependent shapes).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from vllm.config import CompilationMode, VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM as VllmLlamaForCausalLM
from vllm.sequence import IntermediateTensors

from subjective.model_registry.config import ModelConfig
from subjective.model_registry.convert import iter_weights
from subjective.model_registry.llama import RMSNorm, SwiGLU, is_base_parameter
from subjective.model_registry.surprise import SurpriseGate
from subjective.model_registry.vllm_plugin import layers as gated
from subjective.model_registry.vllm_plugin.batch import current_batch
from subjective.model_registry.vllm_plugin.folded import fold_dynamic, fold_temporal
from subjective.model_registry.vllm_plugin.kv_spec import KV_CAPACITY_OVERRIDE, make_compacted
from subjective.model_registry.vllm_plugin.meter import Meter
from subjective.model_registry.vllm_plugin.requests import REGISTRY


def attach_adapter(layer: nn.Module, index: int, config: ModelConfig) -> None:
    """Give a vLLM decoder layer the reference's routing modules for its role."""
    routing, d, eps = config.routing, config.hidden_size, config.rms_norm_eps
    gate = (routing.o_ce_init, routing.m_cu_init, routing.beta_ce, routing.beta_cu)
    layer.ma_window = routing.ma_window
    if routing.kind == "sdt" and index in routing.decision_layers:
        layer.prior_norm = RMSNorm(d, eps)
        layer.prior = SwiGLU(d, routing.prior_width)
        layer.surprise = SurpriseGate(*gate)
    elif routing.kind == "sdt" and index in routing.gated_layers:
        layer.sink_tokens = routing.sink_tokens
        layer.router_norm = RMSNorm(d, eps)
        layer.router = nn.Linear(d, 1)
        layer.prior_norm = RMSNorm(d, eps)
        layer.prior = SwiGLU(d, routing.prior_width)
    elif routing.kind == "stt" and index in routing.gated_layers:
        layer.sink_tokens = routing.sink_tokens
        layer.transition_norm = RMSNorm(d, eps)
        layer.transition = SwiGLU(d, routing.transition_width)
        layer.surprise = SurpriseGate(*gate)
        layer.router_norm = RMSNorm(d, eps)
        layer.router = nn.Linear(2 * d, 1)


Role = Literal["dense", "decision", "dynamic", "temporal"]


def gate_scored(config: ModelConfig) -> list[int]:
    """SDT Decision layers whose surprise gate scores the next layer's tokens at inference."""
    routing = config.routing
    return routing.decision_layers if routing.kind == "sdt" and routing.score == "gate" else []


def layer_roles(config: ModelConfig) -> list[tuple[Role, int | None]]:
    """Each layer's role and its place among its kind's state (gated layers; gate-scored
    Decision layers, None for a Decision layer that feeds no gate)."""
    routing, scored = config.routing, gate_scored(config)
    roles: list[tuple[Role, int | None]] = []
    for index in range(config.num_hidden_layers):
        if routing.kind == "sdt" and index in routing.decision_layers:
            roles.append(("decision", scored.index(index) if index in scored else None))
        elif index in routing.gated_layers:
            role: Role = "dynamic" if routing.kind == "sdt" else "temporal"
            roles.append((role, routing.gated_layers.index(index)))
        else:
            roles.append(("dense", None))
    return roles


class GatedLlamaForCausalLM(VllmLlamaForCausalLM):
    """A converted SDT/STT checkpoint served by vLLM with real skipping."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.model_dir = vllm_config.model_config.model
        self.spec = ModelConfig.from_folder(self.model_dir)
        routing = self.spec.routing
        default = routing.capacity if routing.kv_capacity is None else routing.kv_capacity
        kv_capacity = getattr(self.config, KV_CAPACITY_OVERRIDE, default)
        for index, layer in enumerate(self.model.layers):
            attach_adapter(layer, index, self.spec)
            if index in self.spec.routing.gated_layers and kv_capacity < 1.0:
                make_compacted(layer.self_attn.attn, kv_capacity)
        self.meter = Meter(self.spec)
        self.roles = layer_roles(self.spec)
        compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
        self.steps = gated.Steps.compiled() if compiled else gated.Steps()
        routing, weight = self.spec.routing, next(self.parameters())
        REGISTRY.table.configure(
            gated=len(routing.gated_layers),
            gate_layers=len(gate_scored(self.spec)),
            hidden=self.spec.hidden_size if routing.kind == "stt" else 0,
            window=routing.ma_window,
            dtype=weight.dtype,
            device=weight.device,
        )

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        batch = current_batch(positions, self.spec.routing)
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        gate = None
        for layer, (role, slot) in zip(self.model.layers, self.roles, strict=True):
            if role == "decision":
                h, gate = gated.decision(layer, slot, h, positions, batch, self.steps)
            elif role == "dynamic":
                h = gated.dynamic(layer, slot, h, positions, batch, gate, self.steps)
            elif role == "temporal":
                h = gated.temporal(layer, slot, h, positions, batch, self.steps)
            else:
                h = self.steps.dense(layer, h, positions)
        if batch is not None:
            self.meter.finish_step(batch, REGISTRY.table)
            batch.finish(REGISTRY.table)
        return self.model.norm(h)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Base (vLLM's loader) then adapter (by name), from the folder's own layout.

        vLLM hands over only the folder's safetensors (the adapter); the base checkpoint it
        references is read here, so the iterator given is not used.
        """
        del weights
        items = list(iter_weights(self.model_dir))
        loaded = super().load_weights((n, t) for n, t in items if is_base_parameter(n))
        own = dict(self.named_parameters()) | dict(self.named_buffers())
        with torch.no_grad():
            for name, tensor in items:
                if not is_base_parameter(name):
                    own[name].copy_(tensor.to(own[name].dtype))
                    loaded.add(name)
        for layer, (role, _) in zip(self.model.layers, self.roles, strict=True):
            if role == "dynamic":
                fold_dynamic(layer)
            elif role == "temporal":
                fold_temporal(layer)
        return loaded


class SubjectiveDepthForCausalLM(GatedLlamaForCausalLM):
    pass


class SubjectiveTimescaleForCausalLM(GatedLlamaForCausalLM):
    pass
