"""SDT and STT as vLLM models: vLLM's Llama modules plus the routing adapter, gated forward.

Base weights load through vLLM's own Llama loader (fused QKV, gate/up), the adapter's
parameters by their reference names (`model.layers.N.prior...`); both come from the folder
layout of `convert.py` (base by reference + `routing_adapter.safetensors`). Dense and Decision
layers use vLLM's attention and paged KV as they are; gated layers attend over their compacted
entries (`compact_attention`), in pages sized for the routing capacity γ (`kv_spec`; the
`kv_capacity` hf override changes γ, 1 turns the smaller pages and their cap off). The forward
runs eagerly (data-dependent shapes).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM as VllmLlamaForCausalLM
from vllm.sequence import IntermediateTensors

from subjective.model_registry.config import ModelConfig
from subjective.model_registry.convert import iter_weights
from subjective.model_registry.llama import RMSNorm, SwiGLU, is_base_parameter
from subjective.model_registry.surprise import SurpriseGate
from subjective.model_registry.vllm_plugin import layers as gated
from subjective.model_registry.vllm_plugin.batch import current_batch
from subjective.model_registry.vllm_plugin.kv_spec import KV_CAPACITY_OVERRIDE, make_compacted
from subjective.model_registry.vllm_plugin.meter import Meter


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


class GatedLlamaForCausalLM(VllmLlamaForCausalLM):
    """A converted SDT/STT checkpoint served by vLLM with real skipping."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.model_dir = vllm_config.model_config.model
        self.spec = ModelConfig.from_folder(self.model_dir)
        kv_capacity = getattr(self.config, KV_CAPACITY_OVERRIDE, self.spec.routing.capacity)
        for index, layer in enumerate(self.model.layers):
            attach_adapter(layer, index, self.spec)
            if index in self.spec.routing.gated_layers and kv_capacity < 1.0:
                make_compacted(layer.self_attn.attn, kv_capacity)
        self.meter = Meter(self.spec)

    def forward(
        self,
        input_ids: Tensor | None,
        positions: Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: Tensor | None = None,
    ) -> Tensor:
        routing = self.spec.routing
        batch = current_batch(positions, routing)
        h = inputs_embeds if inputs_embeds is not None else self.model.embed_input_ids(input_ids)
        gate = None
        for index, layer in enumerate(self.model.layers):
            if routing.kind == "sdt" and index in routing.decision_layers:
                h, gate = gated.decision(layer, index, h, positions, batch, routing.score)
            elif routing.kind == "sdt" and index in routing.gated_layers:
                h = gated.dynamic(layer, index, h, positions, batch, gate)
            elif routing.kind == "stt" and index in routing.gated_layers:
                h = gated.temporal(layer, index, h, positions, batch)
            else:
                h = gated.dense(layer, h, positions)
        if batch is not None:
            self.meter.finish_step(batch)
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
        return loaded


class SubjectiveDepthForCausalLM(GatedLlamaForCausalLM):
    pass


class SubjectiveTimescaleForCausalLM(GatedLlamaForCausalLM):
    pass
