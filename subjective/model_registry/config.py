"""Model shape and routing settings, read from (and written to) HF-format `config.json`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Kind = Literal["dense", "sdt", "stt", "hybrid"]
ARCHITECTURES: dict[str, Kind] = {
    "LlamaForCausalLM": "dense",
    "SubjectiveDepthForCausalLM": "sdt",
    "SubjectiveTimescaleForCausalLM": "stt",
    "SubjectiveHybridForCausalLM": "hybrid",
}
LayerType = Literal["full_attention", "linear_attention"]
LAYER_TYPES: tuple[LayerType, ...] = ("full_attention", "linear_attention")


@dataclass
class RoutingConfig:
    """How a gated model routes tokens; stored as the `routing` section of config.json."""

    kind: Kind = "dense"
    # SDT: layer i in `decision_layers` feeds its gate to layer i + 1 (a Dynamic layer).
    decision_layers: list[int] = field(default_factory=list)
    # Dynamic (SDT) or temporal (STT) layers: the ones that skip tokens.
    gated_layers: list[int] = field(default_factory=list)
    capacity: float = 0.5  # gamma: Top-K fraction in training, and the router's calibrated share
    # Fraction of a dense KV page the gated layers' pages hold when vLLM serves the model (None:
    # `capacity`); at most that share of tokens can keep an entry, so it must cover the quality
    # levels' kept shares.
    kv_capacity: float | None = None
    # What the runtime threshold applies to at inference: the causal router's probability, or
    # (SDT only: it is causal there) the Decision layer's surprise gate g itself.
    score: Literal["router", "gate"] = "router"
    threshold: float = 0.5  # base runtime threshold on the router's probability
    quality_offsets: dict[str, float] = field(
        default_factory=lambda: {"aggressive": 0.1, "conservative": -0.1}
    )
    prior_width: int = 0  # SDT prior SwiGLU width (Decision and Dynamic layers)
    transition_width: int = 0  # STT transition SwiGLU width (the skip path's prior)
    # The first `sink_tokens` positions of a sequence always take the full path (attention sinks).
    sink_tokens: int = 4
    ma_window: int = 32  # earlier tokens in the CU moving average
    o_ce_init: float = 1.025
    m_cu_init: float = 1.1
    beta_ce: float = 1.0
    beta_cu: float = 1.0

    def threshold_for(self, quality: str | None) -> float:
        if quality is None:
            return self.threshold
        if quality not in self.quality_offsets:
            raise ValueError(f"unknown quality {quality!r}; known: {sorted(self.quality_offsets)}")
        return self.threshold + self.quality_offsets[quality]


@dataclass
class ModelConfig:
    """The Llama shape (names as in transformers' LlamaConfig) plus optional routing."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    # Hybrids: each layer's attention (`config.json`'s `layer_types`); empty: all softmax.
    layer_types: list[LayerType] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.layer_types:
            return
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layer_types)} layer_types for {self.num_hidden_layers}")
        if any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must be among {LAYER_TYPES}: {self.layer_types}")
        if self.linear_layers and self.routing.kind != "dense":
            raise ValueError("a hybrid with gated (SDT/STT) routing is not implemented")

    @property
    def kind(self) -> Kind:
        return "hybrid" if self.linear_layers else self.routing.kind

    @property
    def linear_layers(self) -> list[int]:
        """Layers running linear attention (Gated DeltaNet) instead of softmax attention."""
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        rope = raw.get("rope_parameters") or {}
        theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise NotImplementedError("only the default rotary embedding is implemented")
        heads = raw["num_attention_heads"]
        routing = RoutingConfig(**raw["routing"]) if "routing" in raw else RoutingConfig()
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads", heads),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            max_position_embeddings=raw.get("max_position_embeddings", 8192),
            routing=routing,
            layer_types=list(raw.get("layer_types") or []),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))

    def routing_dict(self) -> dict[str, Any]:
        return asdict(self.routing)
