"""Server settings: one frozen object, built from the command line or by tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from subjective.server.ledger.pricing import Pricing

Quality = Literal["aggressive", "conservative"]
QUALITY_LEVELS: tuple[Quality, ...] = ("aggressive", "conservative")
# A full context of text, or 64 prompts of token ids, is far smaller.
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


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
    # Without a key, requests run as the `anonymous` key (`make serve` on a laptop); never
    # for admin routes.
    allow_anonymous: bool = False
    # /metrics without an API key (a scraper on a private network); otherwise it wants one.
    public_metrics: bool = False
    # Larger request bodies are refused (413) before they are read or parsed.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # vLLM's tensor parallelism: GPUs one replica spreads the model over (1: no parallelism).
    tensor_parallel_size: int = 1
    # A file holding the first admin key's secret (admin_bootstrap.py); None: no such key.
    admin_key_file: Path | None = None
    pricing: Pricing = field(default_factory=lambda: Pricing(default=DEFAULT_PRICE_PER_TFLOP))


# Currency units per TFLOP executed, for models the pricing file does not name.
DEFAULT_PRICE_PER_TFLOP = "0.0001"


def load_pricing(path: Path) -> Pricing:
    """`{"currency": "USD", "default": "0.0001", "per_tflop": {"model": "0.0002"}}`; rates
    as strings, so no float rounding reaches a bill."""
    raw = json.loads(path.read_text())
    return Pricing(
        per_tflop=raw.get("per_tflop", {}),
        default=raw.get("default"),
        currency=raw.get("currency", "USD"),
    )
