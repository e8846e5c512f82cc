"""vLLM plugin: SDT and STT served by vLLM with real skipping and per-request metering; hybrids.

- `register`: the `vllm.general_plugins` entry point (architectures -> `model.py` classes).
- `engine_kwargs`: the engine arguments a served folder needs beside the server's own.
- `requests`: row of vLLM's persistent batch -> request state (threshold, compute_slots row),
  fed by a logits processor that changes no logit; the gate state of every request is a row of
  preallocated tensors (`StateTable`).
- `batch`, `layers`: one forward step, its rows' state gathered once as tensors, and the
  Decision/Dynamic/temporal layers on vLLM's Llama modules with the reference's gate math
  (`surprise.py`), vectorised over the rows: a layer's cost follows its kept tokens.
- `compact_attention`, `kv_spec`: gated layers keep only their kept tokens' K/V, compacted, in
  pages vLLM allocates at γ of the dense size (so its allocator admits more sequences), through
  `subjective.kernels` (Triton on CUDA, PyTorch on CPU).
- `meter`: each step's executed / dense FLOPs and KV entries per request, into compute_slots.
- `hybrid`: hybrids (softmax + Gated DeltaNet layers) on vLLM's Llama layers and vLLM's own GDN
  layer, their state in vLLM's hybrid KV cache; no gate, so the front end meters them from
  their tokens (`server/meter.py`).

Limits: a gated layer keeps at most `page_entries · (p // block_size + 1)` entries up to
position p (the capacity cap that makes the smaller pages safe; `kv_capacity=1.0` turns it
off); the saving is static per block (vLLM's managers allocate by token position, before the
forward has decided anything, so a layer keeping less than γ does not give the rest back:
that needs per-layer block tables and kept counts reported from the worker to the scheduler);
no prefix caching, speculative decoding or pipeline parallelism for gated models.

Importing this package does not import vLLM; `register` and the model modules do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from subjective.model_registry.config import ModelConfig

MODELS = {
    "SubjectiveDepthForCausalLM": "subjective.model_registry.vllm_plugin.model:"
    "SubjectiveDepthForCausalLM",
    "SubjectiveTimescaleForCausalLM": "subjective.model_registry.vllm_plugin.model:"
    "SubjectiveTimescaleForCausalLM",
    "SubjectiveHybridForCausalLM": "subjective.model_registry.vllm_plugin.hybrid:"
    "SubjectiveHybridForCausalLM",
}
# Hybrids (`hybrid.py`): no prefix caching (a cached prefix would need the linear layers' state
# at each block boundary); eager or compiled (the same tokens, checked on CPU). The recurrent
# state in bfloat16, half of float32's bytes: more sequences in a KV budget (vLLM's CPU platform
# keeps it for its GDN kernels, and would make "auto" float32).
HYBRID_ENGINE_KWARGS: dict[str, Any] = {
    "enable_prefix_caching": False,
    "mamba_ssm_cache_dtype": "bfloat16",
}
REQUEST_ROWS = "subjective.model_registry.vllm_plugin.requests:RequestRows"
# What each request tells its gates through `SamplingParams.extra_args` (beside the meter's
# slot and tag, `compute_slots`): its quality, and the threshold it runs with.
EXTRA_ARG_QUALITY = "quality"
EXTRA_ARG_THRESHOLD = "threshold"


def register() -> None:
    """Register our architectures with vLLM's ModelRegistry (lazily, by import string)."""
    from vllm import ModelRegistry

    for architecture, target in MODELS.items():
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)


def engine_kwargs(model_dir: str | Path, kv_capacity: float | None = None) -> dict[str, Any]:
    """Extra `AsyncEngineArgs` for serving `model_dir`; empty for a dense model. A hybrid on a
    CPU runs in bfloat16 whatever the server's dtype (vLLM's CPU GDN kernels take nothing else).

    Gated models need: the row-tracking logits processor (per-request threshold and meter
    slot reach the gates) and no prefix caching (a cached block's KV depends on the threshold
    that wrote it, and skipped prefix tokens would not be metered). Compiled or eager is the
    caller's choice (compiled: `layers.Steps`). `kv_capacity` overrides γ, the fraction of a
    dense page a gated layer's KV pages hold (default: the checkpoint's routing capacity;
    1.0: dense pages, no capacity cap).
    """
    kind = ModelConfig.from_folder(model_dir).kind
    if kind == "dense":
        return {}
    if kind == "hybrid":
        from vllm.platforms import current_platform

        cpu = {"dtype": "bfloat16"} if current_platform.is_cpu() else {}
        return {**HYBRID_ENGINE_KWARGS, **cpu}
    kwargs: dict[str, Any] = {
        "logits_processors": [REQUEST_ROWS],
        "enable_prefix_caching": False,
    }
    if kv_capacity is not None:
        kwargs["hf_overrides"] = {"kv_capacity": float(kv_capacity)}
    return kwargs
