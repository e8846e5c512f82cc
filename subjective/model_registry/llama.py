"""A readable Llama decoder in plain PyTorch whose layers can run on a subset of the tokens.

Parameter names follow transformers' `LlamaForCausalLM` (`model.layers.N.self_attn.q_proj`, ...),
so an HF-format folder loads by name. Every layer works on *packed* tokens: the hidden states of
the tokens it runs on are gathered into `[N, d]` (grouped by sequence), so a token a gated layer
skips costs no projection, attention or MLP work and writes no KV entry. Attention is computed
per sequence between the new queries and the layer's kept entries, causal by original position.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from subjective.model_registry.cache import KVCache, LayerCache, LayerKV
from subjective.model_registry.config import ModelConfig

LogitsMode = Literal["all", "last", "none"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(at_least_fp32(x.dtype))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """Norms, rotary and softmax run in float32 for half types (as HF does), float64 stays."""
    return torch.promote_types(dtype, torch.float32)


def rope_cos_sin(
    positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos/sin `[N, head_dim]` for the default (unscaled) rotary embedding."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim
    )
    freqs = positions.to(dtype)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `[N, heads, head_dim]` by per-token angles (the half-split convention of HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    wide = cos.dtype
    out = x.to(wide) * cos[:, None, :] + rotated.to(wide) * sin[:, None, :]
    return out.to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor:
    """Causal attention of one sequence: q `[n, H, hd]` over entries k, v `[L, H_kv, hd]`.

    Entry j is visible to query i when `k_pos[j] <= q_pos[i]` (original token positions), so
    compacted caches need no position bookkeeping beyond their stored positions.
    """
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    qh = q.transpose(0, 1)
    kh = k.transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    vh = v.transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    scores = (qh @ kh.transpose(1, 2)) * (1.0 / math.sqrt(head_dim))
    visible = k_pos[None, :] <= q_pos[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores.to(at_least_fp32(scores.dtype)), dim=-1).to(q.dtype)
    return (probs @ vh).transpose(0, 1)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.rope_theta = config.rope_theta
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(
        self, x: Tensor, positions: Tensor, counts: list[int], kv: LayerKV | None
    ) -> Tensor:
        """x `[N, d]` packed by sequence (`counts[b]` tokens of sequence b, in order)."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.heads, self.head_dim)
        k = self.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.kv_heads, self.head_dim)
        cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, at_least_fp32(x.dtype))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = q.new_zeros(n, self.heads, self.head_dim)
        start = 0
        for b, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            start += count
            k_b, v_b, pos_b = k[rows], v[rows], positions[rows]
            if kv is not None:
                kv.append(b, k_b, v_b, pos_b)
                k_b, v_b, pos_b = kv.keys[b], kv.values[b], kv.positions[b]
            out[rows] = attend(q[rows], k_b, v_b, positions[rows], pos_b)
        return self.o_proj(out.view(n, self.heads * self.head_dim))


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`: Llama's MLP, also the SDT prior and STT transition net."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=False)
        self.up_proj = nn.Linear(dim, width, bias=False)
        self.down_proj = nn.Linear(width, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class ForwardContext:
    """What one forward call shares with every layer, and what layers report back."""

    valid: Tensor  # [B, T] bool: real tokens (right padding is False)
    positions: Tensor  # [B, T] long: original positions
    cache: KVCache | None
    topk: bool  # Top-K routing (training) instead of router + threshold (inference)
    threshold: Tensor  # [B] runtime threshold per sequence
    forced_routing: Mapping[int, Tensor] | None = None
    routing: dict[int, Tensor] = field(default_factory=dict)
    gates: dict[int, Tensor] = field(default_factory=dict)
    aux: dict[str, list[Tensor]] = field(default_factory=dict)
    pending_gate: Tensor | None = None  # SDT: the Decision layer's g `[B, T]` for the next layer

    def kv(self, layer: int) -> LayerCache | None:
        return None if self.cache is None else self.cache.layers[layer]

    def add_aux(self, name: str, value: Tensor) -> None:
        self.aux.setdefault(name, []).append(value)


def counts_of(mask: Tensor) -> list[int]:
    return mask.sum(dim=1).tolist()


class LlamaDecoderLayer(nn.Module):
    """A pre-norm Llama block; `forward` runs it densely on every valid token.

    `attention` replaces the softmax attention (hybrids: a linear attention with the same
    `forward(x, positions, counts, cache)` on packed tokens)."""

    def __init__(self, config: ModelConfig, index: int, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.index = index
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config) if attention is None else attention
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def block(
        self, x: Tensor, positions: Tensor, counts: list[int], kv: LayerCache | None
    ) -> tuple[Tensor, Tensor]:
        """The block's attention and MLP updates for packed tokens: `Block(x) = attn + mlp`."""
        attn = self.self_attn(self.input_layernorm(x), positions, counts, kv)
        mlp = self.mlp(self.post_attention_layernorm(x + attn))
        return attn, mlp

    def run_dense(self, h: Tensor, ctx: ForwardContext, kv: LayerCache | None) -> Tensor:
        """`H + Block(H)` for every valid token, added in HF's order; returns packed `[N, d]`."""
        x = h[ctx.valid]
        attn, mlp = self.block(x, ctx.positions[ctx.valid], counts_of(ctx.valid), kv)
        mid = x + attn
        return mid + mlp

    def forward(self, h: Tensor, ctx: ForwardContext) -> Tensor:
        out = h.clone()
        out[ctx.valid] = self.run_dense(h, ctx, ctx.kv(self.index))
        return out


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # [B, T, V] ("all") or [B, V] ("last": each row's last valid token)
    routing: dict[int, Tensor]  # gated layer -> [B, T] bool, True = took the full path
    gates: dict[int, Tensor]  # gated layer -> [B, T] gate g (0 where not computed)
    aux: dict[str, Tensor]  # auxiliary training losses, averaged over layers
    cache: KVCache | None


class LlamaForCausalLM(nn.Module):
    """Dense Llama; SDT/STT subclasses replace some layers (see `make_layer`)."""

    architecture = "LlamaForCausalLM"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(
            [self.make_layer(i) for i in range(config.num_hidden_layers)]
        )
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_layer(self, index: int) -> nn.Module:
        return LlamaDecoderLayer(self.config, index)

    def new_cache(self, batch: int) -> KVCache:
        return KVCache.empty(self.config.num_hidden_layers, batch, self.lm_head.weight.device)

    def forward(
        self,
        input_ids: Tensor,
        *,
        valid: Tensor | None = None,
        cache: KVCache | None = None,
        threshold: float | Tensor | None = None,
        routing: Mapping[int, Tensor] | None = None,
        topk: bool | None = None,
        logits: LogitsMode = "all",
    ) -> CausalLMOutput:
        """Run `input_ids` `[B, T]` (right-padded where `valid` is False).

        With `cache`, tokens continue each sequence after its `cache.seq_lens[b]` earlier ones
        and their kept K/V are appended (prefill and decode are the same call). `routing`
        forces the decisions of gated layers (`{layer: [B, T] bool}`) instead of deciding;
        `topk` picks training-style Top-K routing (default: `self.training`); `threshold`
        (scalar or `[B]`) is the runtime threshold (default: the config's base threshold).
        """
        batch, length = input_ids.shape
        device = input_ids.device
        if valid is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        start = cache.seq_lens if cache is not None else torch.zeros(batch, dtype=torch.long)
        positions = start.to(device)[:, None] + torch.arange(length, device=device)[None, :]
        if threshold is None:
            threshold = self.config.routing.threshold
        thresholds = torch.as_tensor(threshold, dtype=torch.float32, device=device).expand(batch)
        ctx = ForwardContext(
            valid=valid,
            positions=positions,
            cache=cache,
            topk=self.training if topk is None else topk,
            threshold=thresholds,
            forced_routing=routing,
        )
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, ctx)
        if cache is not None:
            cache.seq_lens = cache.seq_lens + valid.sum(dim=1).to(cache.seq_lens.device)
        out_logits = None
        if logits == "all":
            out_logits = self.lm_head(self.model.norm(h))
        elif logits == "last":
            last = valid.sum(dim=1) - 1
            out_logits = self.lm_head(self.model.norm(h[torch.arange(batch), last]))
        aux = {name: torch.stack(values).mean() for name, values in ctx.aux.items()}
        return CausalLMOutput(out_logits, ctx.routing, ctx.gates, aux, cache)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32):
        """A dense model from an HF-format Llama folder (config.json + safetensors)."""
        config = ModelConfig.from_folder(folder)
        model = cls(config)
        load_base_weights(model, read_safetensors_dir(folder))
        return model.to(dtype).eval()


def read_safetensors_dir(folder: str | Path) -> dict[str, Tensor]:
    """All tensors of an HF folder: `model.safetensors` or the shards its index lists."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    return load_file(folder / "model.safetensors")


def load_base_weights(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load Llama weights by name; every dense parameter must be present (tied head aside)."""
    own = model.state_dict()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    missing = []
    with torch.no_grad():
        for name, param in own.items():
            if name in state:
                if state[name].shape != param.shape:
                    raise ValueError(f"{name}: checkpoint {tuple(state[name].shape)} != model")
                param.copy_(state[name].to(param.dtype))
            elif not (tied and name == "lm_head.weight"):
                missing.append(name)
    base_missing = [n for n in missing if is_base_parameter(n)]
    if base_missing:
        raise KeyError(f"checkpoint lacks {base_missing[:5]} ({len(base_missing)} in all)")


BASE_PARTS = (
    "self_attn.",
    "mlp.",
    "input_layernorm.",
    "post_attention_layernorm.",
)


def is_base_parameter(name: str) -> bool:
    """True for names a dense Llama checkpoint holds; False for routing-adapter parameters."""
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return True
    if not name.startswith("model.layers."):
        return False
    rest = name.split(".", 3)[3]
    return rest.startswith(BASE_PARTS)
