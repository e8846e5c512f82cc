"""Server settings: one frozen object, built from the command line or by tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Quality = Literal["aggressive", "conservative"]
QUALITY_LEVELS: tuple[Quality, ...] = ("aggressive", "conservative")


@dataclass(frozen=True)
class ServerConfig:
    model_dir: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    # Eager mode loads in ~20 s instead of ~100 s with torch.compile; tests use it.
    enforce_eager: bool = False
    # vLLM's CPU backend sizes its KV cache from this (GiB); its default probe is unreliable.
    kv_cache_gib: int = 2
    default_quality: Quality = "conservative"
