"""Step b of the GPU suite: one decode step of a gated decoder stack under a thin runner.

The runner drives the reference model's own modules (projections, norms, MLP, rotary, the SDT
router and prior, the STT router and transition net; `subjective.model_registry`) over the
kernels' compacted paged KV layout (`subjective.kernels.layout`), one token per sequence, no
vLLM. A *plan* fixes, per layer, which rows of the batch run the block (routing forced to a
capacity: the router still runs, so its cost is paid) and how many kept entries each sequence
has in that layer before the step. Attention: `gated_decode_attention` (Triton on CUDA) for
every layer, or for the dense baseline also torch SDPA (flash) over the same cache read as
contiguous memory (block tables are sequential: sequence b owns blocks b·n .. b·n + n − 1).

`check_runner` holds the runner to the reference model's cached decode on a tiny model, so the
timed code computes what the model computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import sdpa_kernel

from benchmarks.kernels import DENSE_BACKENDS
from subjective.kernels import gated_decode_attention, kept_slot_mapping, write_kept_kv
from subjective.kernels.backend import Backend
from subjective.model_registry.config import Kind, ModelConfig
from subjective.model_registry.convert import build_model, default_routing
from subjective.model_registry.llama import (
    LlamaForCausalLM,
    apply_rope,
    at_least_fp32,
    rope_cos_sin,
)
from subjective.model_registry.sdt import DynamicLayer
from subjective.model_registry.skip_fit import predict, router_logits
from subjective.model_registry.stt import TemporalLayer
from subjective.model_registry.tiny import tiny_config

SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
    ),
    "llama-1b": ModelConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
    ),
    "tiny": tiny_config(),
}  # fmt: skip


@dataclass
class PagedKV:
    """Every layer's compacted paged cache; sequence b owns blocks b·n .. b·n + n − 1."""

    k: list[Tensor]  # per layer [B · n, block_size, kv_heads, head_dim]
    v: list[Tensor]
    table: Tensor  # [B, n] int32
    block_size: int

    @classmethod
    def allocate(
        cls, config: ModelConfig, batch: int, entries: int, block_size: int, dtype, device
    ) -> PagedKV:
        """Caches for `entries` per sequence and layer, filled with random values."""
        blocks = math.ceil(entries / block_size)
        shape = (batch * blocks, block_size, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        k = [torch.randn(shape, dtype=dtype, device=device) for _ in layers]
        v = [torch.randn(shape, dtype=dtype, device=device) for _ in layers]
        table = torch.arange(batch * blocks, dtype=torch.int32, device=device).view(batch, blocks)
        return cls(k, v, table, block_size)

    def contiguous(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s first `length` entries of every sequence as `[B, kv_heads, L, D]`."""
        batch = self.table.shape[0]
        k, v = (c[layer].view(batch, -1, *c[layer].shape[2:]) for c in (self.k, self.v))
        return k[:, :length].transpose(1, 2), v[:, :length].transpose(1, 2)


@dataclass
class LayerPlan:
    """One layer's step: the rows that run the block (None: all), what they attend, where the
    new K/V go; `skipped` rows take the skip path."""

    rows: Tensor | None
    skipped: Tensor | None
    table: Tensor  # block-table rows of the running sequences
    attended: Tensor  # [n] int32: entries each running row attends (its new one included)
    slots: Tensor  # [n] flat cache slots of the new entries
    max_len: int
    dense_length: int | None = None  # uniform length: the SDPA path may read the cache


@dataclass
class StepPlan:
    layers: list[LayerPlan]
    cos: Tensor
    sin: Tensor
    prev: dict[int, Tensor]  # STT layer -> [B, d] previous token's inputs (x_{t-1})


def layer_plan(cache: PagedKV, lens: Tensor, rows: Tensor | None, uniform: bool) -> LayerPlan:
    """Plan of one layer whose sequences hold `lens` `[B]` entries; `rows` run the block."""
    batch = lens.numel()
    index = torch.arange(batch, device=lens.device) if rows is None else rows
    before = lens[index]
    ones = torch.ones_like(before)
    table = cache.table[index]
    slots = kept_slot_mapping(table, before, ones, cache.block_size, seq=torch.arange(len(index)))
    skipped = None
    if rows is not None:
        keep = torch.ones(batch, dtype=torch.bool, device=lens.device)
        keep[rows] = False
        skipped = keep.nonzero().flatten()
    attended = (before + 1).to(torch.int32)
    max_len = int(attended.max()) if attended.numel() else 1
    return LayerPlan(rows, skipped, table, attended, slots, max_len, max_len if uniform else None)


def rope_of(config: ModelConfig, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return rope_cos_sin(positions, config.head_dim, config.rope_theta, at_least_fp32(dtype))


Attention = Callable[[int, Tensor, Tensor, Tensor, LayerPlan], Tensor]


def paged_attention(cache: PagedKV, backend: Backend) -> Attention:
    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, plan: LayerPlan) -> Tensor:
        write_kept_kv(k, v, cache.k[layer], cache.v[layer], plan.slots)
        return gated_decode_attention(
            q, cache.k[layer], cache.v[layer], plan.table, plan.attended,
            max_kept_len=plan.max_len, backend=backend,
        )  # fmt: skip

    return attend


def sdpa_attention(cache: PagedKV) -> Attention:
    """Dense baseline: torch's fused SDPA over the cache read as contiguous sequences."""

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor, plan: LayerPlan) -> Tensor:
        write_kept_kv(k, v, cache.k[layer], cache.v[layer], plan.slots)
        keys, values = cache.contiguous(layer, plan.dense_length)
        with sdpa_kernel(DENSE_BACKENDS):
            out = F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)
        return out[:, :, 0]

    return attend


def block(layer: nn.Module, index: int, x: Tensor, plan: StepPlan, attend: Attention) -> Tensor:
    """`x + Block(x)` of the running rows, added in the reference model's order."""
    attn = layer.self_attn
    n = x.shape[0]
    xn = layer.input_layernorm(x)
    q = attn.q_proj(xn).view(n, attn.heads, attn.head_dim)
    k = attn.k_proj(xn).view(n, attn.kv_heads, attn.head_dim)
    v = attn.v_proj(xn).view(n, attn.kv_heads, attn.head_dim)
    mine = plan.layers[index]
    cos, sin = (t if mine.rows is None else t[mine.rows] for t in (plan.cos, plan.sin))
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    mid = x + attn.o_proj(attend(index, q, k, v, mine).reshape(n, -1))
    return mid + layer.mlp(layer.post_attention_layernorm(mid))


def run_layer(layer: nn.Module, index: int, h: Tensor, plan: StepPlan, attend: Attention) -> Tensor:
    mine = plan.layers[index]
    if not isinstance(layer, DynamicLayer | TemporalLayer):
        return block(layer, index, h, plan, attend)
    prev = plan.prev.get(index, h)
    router_logits(layer, h, prev)  # the router's cost; the plan has fixed the routing
    if mine.rows is None:
        return block(layer, index, h, plan, attend)
    out = h.index_copy(0, mine.rows, block(layer, index, h[mine.rows], plan, attend))
    skipped = h[mine.skipped]
    guess = predict(layer, skipped, prev[mine.skipped])
    return out.index_copy_(0, mine.skipped, skipped + guess)


def decode_step(model: LlamaForCausalLM, ids: Tensor, plan: StepPlan, attend: Attention) -> Tensor:
    """Logits `[B, V]` of one token per sequence."""
    h = model.model.embed_tokens(ids)
    for index, layer in enumerate(model.model.layers):
        h = run_layer(layer, index, h, plan, attend)
    return model.lm_head(model.model.norm(h))


# ----------------------------------------------------------------------------- benchmark


def gated_config(shape: ModelConfig, kind: Kind) -> ModelConfig:
    return replace(shape, routing=default_routing(kind, shape))


def forced_plan(
    model: LlamaForCausalLM,
    cache: PagedKV,
    context: int,
    capacity: float,
    gen: torch.Generator,
) -> StepPlan:
    """Every sequence at `context` tokens; gated layers kept `capacity` of them and run the
    block on `capacity` of the rows (random rows, at least one)."""
    batch, device = cache.table.shape[0], cache.table.device
    gated = set(model.config.routing.gated_layers)
    layers = []
    for index in range(model.config.num_hidden_layers):
        kept = round(capacity * context) if index in gated else context
        rows = None
        if index in gated and capacity < 1.0:
            count = max(1, round(capacity * batch))
            rows = torch.randperm(batch, generator=gen)[:count].sort().values.to(device)
        lens = torch.full((batch,), kept, dtype=torch.int32, device=device)
        layers.append(layer_plan(cache, lens, rows, uniform=True))
    positions = torch.full((batch,), context, device=device)
    cos, sin = rope_of(model.config, positions, cache.k[0].dtype)
    d = model.config.hidden_size
    prev = {
        i: torch.randn(batch, d, generator=gen).to(device, cache.k[0].dtype)
        for i in gated
        if isinstance(model.model.layers[i], TemporalLayer)
    }
    return StepPlan(layers, cos, sin, prev)


def timed_step(
    fn: Callable[[], Tensor], device: torch.device, measure: Callable[[Callable], float]
) -> tuple[float, str]:
    """Median ms of `fn`: replayed as a CUDA graph where it captures, else eagerly."""
    if device.type != "cuda":
        return measure(fn), "eager"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return measure(fn), "eager"
    return measure(graph.replay), "cuda-graph"


@dataclass
class LayerBench:
    """What step b runs: shapes, contexts, batch, capacities, dtype and device."""

    shapes: list[str]
    contexts: list[int]
    batch: int
    capacities: list[float]
    block_size: int
    dtype: torch.dtype
    device: torch.device
    backend: Backend


def variants(bench: LayerBench) -> list[tuple[str, Kind, str, float]]:
    """(variant, kind, setting, capacity) rows of one shape and context; dense ones first."""
    rows = [("dense", "dense", "sdpa", 1.0), ("dense-paged", "dense", "paged kernel", 1.0)]
    if bench.device.type != "cuda":
        rows = rows[1:]  # the fused SDPA kernels are CUDA's
    for kind in ("sdt", "stt"):
        rows += [(kind, kind, f"capacity={c:g}", c) for c in bench.capacities]
    return rows


def bench_context(
    bench: LayerBench,
    shape: str,
    context: int,
    measure: Callable[[Callable], float],
    gen: torch.Generator,
) -> list[dict]:
    base = SHAPES[shape]
    cache = PagedKV.allocate(base, bench.batch, context + 1, bench.block_size, bench.dtype,
                             bench.device)  # fmt: skip
    ids = torch.randint(0, base.vocab_size, (bench.batch,), generator=gen).to(bench.device)
    rows, models = [], {}
    for variant, kind, setting, capacity in variants(bench):
        if kind not in models:
            models.clear()  # one model on the device at a time
            with torch.device(bench.device):
                models[kind] = build_model(gated_config(base, kind)).to(bench.dtype).eval()
        model = models[kind]
        plan = forced_plan(model, cache, context, capacity, gen)
        attend = (
            sdpa_attention(cache) if setting == "sdpa" else paged_attention(cache, bench.backend)
        )
        row = {"shape": shape, "context": context, "variant": variant, "setting": setting}
        try:
            with torch.inference_mode():
                step = partial(decode_step, model, ids, plan, attend)
                ms, timing = timed_step(step, bench.device, measure)
        except (RuntimeError, ValueError) as error:  # one failing variant must not end the run
            rows.append(row | {"error": f"{type(error).__name__}: {error}"[:500]})
            continue
        rows.append(row | {"step_ms": ms, "tokens_per_s": bench.batch / ms * 1e3,
                           "timing": timing, "batch": bench.batch})  # fmt: skip
        print(f"{shape} ctx={context} {variant} {setting}: {ms:.3f} ms", flush=True)
    dense = [r["step_ms"] for r in rows if r["variant"].startswith("dense") and "step_ms" in r]
    for r in rows:
        if "step_ms" in r and dense:
            r["ratio_to_dense"] = min(dense) / r["step_ms"]
    return rows


def bench_layers(bench: LayerBench, measure: Callable[[Callable], float]) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in bench.shapes:
        for context in bench.contexts:
            rows += bench_context(bench, shape, context, measure, gen)
            if bench.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- equivalence


def cache_from_reference(
    model: LlamaForCausalLM, reference, block_size: int
) -> tuple[PagedKV, list[Tensor]]:
    """The reference cache's kept entries in a paged cache, and each layer's lengths `[B]`."""
    config, batch = model.config, reference.seq_lens.numel()
    lengths = [torch.tensor(layer.lengths()) for layer in reference.layers]
    most = max(int(n.max()) for n in lengths) + 1
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    cache = PagedKV.allocate(config, batch, most, block_size, dtype, device)
    for i, layer in enumerate(reference.layers):
        lens = lengths[i].to(device)
        slots = kept_slot_mapping(cache.table, torch.zeros_like(lens), lens, block_size)
        k = torch.cat([t for t in layer.keys if t is not None])
        v = torch.cat([t for t in layer.values if t is not None])
        write_kept_kv(k, v, cache.k[i], cache.v[i], slots)
    return cache, [n.to(device) for n in lengths]


def check_runner(kind: Kind, device: torch.device, backend: Backend, seed: int = 0) -> dict:
    """Relative error of the runner's logits against the reference model's cached decode step,
    tiny float32 model, random forced routing in prompt and step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    batch, prompt_len = 3, 9
    with torch.device(device):
        model = build_model(tiny_config(kind, layers=4)).float().eval()
    gated = model.config.routing.gated_layers
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    step = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
    prompt_routing = {i: torch.rand(batch, prompt_len, generator=gen) < 0.6 for i in gated}
    step_routing = {i: torch.tensor([[True], [False], [True]]) for i in gated}
    with torch.no_grad():
        reference = model.new_cache(batch)
        model(prompt.to(device), cache=reference, routing=prompt_routing, logits="none")
        cache, lengths = cache_from_reference(model, reference, block_size=4)
        prev = {i: torch.stack(reference.gate_state(i).prev_input) for i in gated if kind == "stt"}
        positions = torch.full((batch,), prompt_len, device=device)
        cos, sin = rope_of(model.config, positions, torch.float32)
        layers = [
            layer_plan(cache, lengths[i], step_routing[i][:, 0].nonzero().flatten().to(device)
                       if i in gated else None, uniform=False)
            for i in range(model.config.num_hidden_layers)
        ]  # fmt: skip
        plan = StepPlan(layers, cos, sin, prev)
        ours = decode_step(model, step[:, 0].to(device), plan, paged_attention(cache, backend))
        expected = model(step.to(device), cache=reference, routing=step_routing).logits[:, 0]
    error = float((ours - expected).norm() / expected.norm())
    return {"kind": kind, "relative_error": error, "passed": error < 1e-3}
