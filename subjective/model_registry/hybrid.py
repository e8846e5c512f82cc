"""Hybrid attention models: a Llama whose listed layers run Gated DeltaNet instead of softmax.

`config.layer_types[i]` is `"full_attention"` or `"linear_attention"` (saved in config.json, with
`architectures: ["SubjectiveHybridForCausalLM"]`). A linear layer keeps the block (norms, MLP)
and replaces only `self_attn`; it runs on packed tokens like the other layers, each sequence's
recurrence continuing from its state in the cache (`LinearState`: constant size, no KV entries),
while softmax layers keep their KV as usual.

Checkpoints hold full weights (`model.safetensors`), not base + adapter: stage 2 of the
distillation trains every parameter, and the linear layers' k/v projections are wider than the
teacher's, so no part of a distilled hybrid is the teacher's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from subjective.model_registry.cache import KVCache
from subjective.model_registry.config import LayerType
from subjective.model_registry.gated_deltanet import GatedDeltaNet, init_from_attention
from subjective.model_registry.llama import LlamaDecoderLayer, LlamaForCausalLM


class HybridForCausalLM(LlamaForCausalLM):
    architecture = "SubjectiveHybridForCausalLM"

    def make_layer(self, index: int) -> nn.Module:
        if index in self.config.linear_layers:
            return LlamaDecoderLayer(self.config, index, GatedDeltaNet(self.config))
        return LlamaDecoderLayer(self.config, index)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.empty(
            self.config.num_hidden_layers,
            batch,
            self.lm_head.weight.device,
            linear_layers=self.config.linear_layers,
        )


@torch.no_grad()
def hybridize(teacher: LlamaForCausalLM, layer_types: Sequence[LayerType]) -> HybridForCausalLM:
    """A hybrid of the dense `teacher`: every weight copied, the linear layers initialised from
    the teacher's attention of the same layer (`init_from_attention`), their gates fresh."""
    if teacher.config.kind != "dense":
        raise ValueError("hybridize a dense model")
    config = replace(teacher.config, layer_types=list(layer_types))
    model = HybridForCausalLM(config).to(teacher.lm_head.weight)
    state = {
        name: tensor
        for name, tensor in teacher.state_dict().items()
        if not any(name.startswith(f"model.layers.{i}.self_attn.") for i in config.linear_layers)
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    linear = {f"model.layers.{i}.self_attn." for i in config.linear_layers}
    if unexpected or any(not name.startswith(tuple(linear)) for name in missing):
        raise KeyError(f"teacher and hybrid disagree: {unexpected[:3]} {missing[:3]}")
    for i in config.linear_layers:
        init_from_attention(model.model.layers[i].self_attn, teacher.model.layers[i].self_attn)
    return model.eval()
