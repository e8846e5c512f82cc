"""Tiny random configurations for tests and examples (no download, runs in milliseconds)."""

from __future__ import annotations

from dataclasses import replace

from subjective.model_registry.config import Kind, ModelConfig
from subjective.model_registry.convert import default_routing


def tiny_config(
    kind: Kind = "dense", *, layers: int = 4, capacity: float = 0.5, score: str = "router"
) -> ModelConfig:
    base = ModelConfig(
        vocab_size=101,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        max_position_embeddings=256,
    )
    routing = replace(default_routing(kind, base, capacity=capacity), score=score)
    return replace(base, routing=routing)
