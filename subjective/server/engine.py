"""Build vLLM's AsyncLLM for a served model, and stop serving once it died."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import torch

from subjective.server.config import ServerConfig
from subjective.server.generation import Generator

log = logging.getLogger(__name__)

# How often the watcher reads the engine's state (an attribute read), and how long the server
# keeps answering (503 to probes and requests, in-flight responses ending with their error)
# between the engine's death and the start of its shutdown.
WATCH_POLL_S = 0.25
DEATH_GRACE_S = 3.0


def engine_config(config: ServerConfig):
    """vLLM's config for serving `config.model_dir`, as its platform settles it (the CPU
    platform may change the cache dtypes asked for).

    vllm is imported here, not at module level: importing it takes seconds.
    """
    # vLLM's CPU backend sizes its KV cache from this; its own memory probe is unreliable.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_gib)
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    # The context `AsyncLLM.from_engine_args` passes (it picks the batch-size defaults).
    return AsyncEngineArgs(**engine_args(config)).create_engine_config(UsageContext.ENGINE_CONTEXT)


def build_engine(vllm_config):
    """An AsyncLLM on `engine_config`'s config; its engine core runs in a process of its own."""
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_vllm_config(vllm_config)


def recurrent_state_dtype(vllm_config) -> torch.dtype:
    """The dtype vLLM's cache keeps a hybrid's recurrent state in (what its meter bills)."""
    from subjective.model_registry.vllm_plugin.hybrid import SubjectiveHybridForCausalLM

    return SubjectiveHybridForCausalLM.get_mamba_state_dtype_from_config(vllm_config)[1]


def engine_args(config: ServerConfig) -> dict:
    """vLLM's engine arguments for `config`: one worker in the engine core's process, or one
    per GPU (vLLM's multiprocessing executor) when the model is split by tensor parallelism."""
    from subjective.model_registry.vllm_plugin import engine_kwargs

    args = {
        "model": str(config.model_dir),
        "served_model_name": config.served_model_name,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "enforce_eager": config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "distributed_executor_backend": "uni" if config.tensor_parallel_size == 1 else "mp",
    }
    # What our model plugin needs for this folder (gated models: its request tracking).
    args.update(engine_kwargs(config.model_dir))
    return args


async def watch_engine(
    generator: Generator,
    on_dead: Callable[[], None],
    *,
    poll_s: float = WATCH_POLL_S,
    grace_s: float = DEATH_GRACE_S,
) -> None:
    """Call `on_dead` `grace_s` after the engine is first seen dead, then return.

    Nothing in this process can start the engine core again: a supervisor must restart the
    whole process, and `on_dead` is how the server is told to exit for that."""
    while not generator.engine_dead:
        await asyncio.sleep(poll_s)
    log.error("the vLLM engine core died: this server stops in %.1f s", grace_s)
    await asyncio.sleep(grace_s)
    on_dead()
