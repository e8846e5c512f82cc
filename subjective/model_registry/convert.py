"""Dense Llama folder → SDT/STT folder stored as base checkpoint + routing adapter, and loading.

A converted folder holds config.json (`architectures`, a `routing` section and `base_model`, the
base checkpoint folder relative to this one), `routing_adapter.safetensors` (priors, routers,
transition nets, gate scalars: the only new parameters) and the tokenizer files. A folder that
also holds its own `model.safetensors` (a full fine-tune) uses those base weights instead.
Hybrid folders (`hybrid.py`) always hold full weights and a `layer_types` list, no adapter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from subjective.model_registry.config import ARCHITECTURES, Kind, ModelConfig, RoutingConfig
from subjective.model_registry.distil import assemble
from subjective.model_registry.hybrid import HybridForCausalLM
from subjective.model_registry.llama import (
    LlamaForCausalLM,
    is_base_parameter,
    load_base_weights,
    read_safetensors_dir,
)
from subjective.model_registry.sdt import SubjectiveDepthForCausalLM
from subjective.model_registry.stt import SubjectiveTimescaleForCausalLM

ADAPTER_FILE = "routing_adapter.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
MODEL_CLASSES: dict[Kind, type[LlamaForCausalLM]] = {
    "dense": LlamaForCausalLM,
    "sdt": SubjectiveDepthForCausalLM,
    "stt": SubjectiveTimescaleForCausalLM,
    "hybrid": HybridForCausalLM,
}


def default_routing(
    kind: Kind,
    config: ModelConfig,
    capacity: float = 0.5,
    threshold: float = 0.5,
    gated_layers: list[int] | None = None,
    prior_width: int | None = None,
) -> RoutingConfig:
    """Alternate layers by default: SDT pairs (Decision 2i, Dynamic 2i+1), STT gates odd layers.

    `gated_layers` picks the Dynamic/temporal layers instead (SDT: layer i - 1 of each becomes
    its Decision layer, so no two gated layers may be adjacent and layer 0 cannot be gated).
    `prior_width`: the skip-path priors' (SDT) or transition networks' (STT) width, d/16 by
    default.
    """
    n, d = config.num_hidden_layers, config.hidden_size
    gated = sorted(gated_layers) if gated_layers is not None else list(range(1, n, 2))
    if any(not 0 <= i < n for i in gated) or len(set(gated)) != len(gated):
        raise ValueError(f"gated layers {gated} must be distinct and in 0..{n - 1}")
    if kind == "sdt" and (0 in gated or any(i - 1 in gated for i in gated)):
        raise ValueError("SDT: each Dynamic layer needs a dense Decision layer just before it")
    return RoutingConfig(
        kind=kind,
        decision_layers=[i - 1 for i in gated] if kind == "sdt" else [],
        gated_layers=gated if kind != "dense" else [],
        capacity=capacity,
        threshold=threshold,
        prior_width=(prior_width or max(1, d // 16)) if kind == "sdt" else 0,
        transition_width=(prior_width or max(1, d // 16)) if kind == "stt" else 0,
    )


def build_model(config: ModelConfig) -> LlamaForCausalLM:
    return MODEL_CLASSES[config.kind](config)


def has_base_weights(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()


def base_folder_of(folder: str | Path) -> Path:
    """Where a folder's base weights live: itself, or its `base_model` (relative) folder."""
    folder = Path(folder)
    if has_base_weights(folder):
        return folder
    raw = json.loads((folder / "config.json").read_text())
    if "base_model" not in raw:
        raise FileNotFoundError(f"{folder} holds no weights and names no base_model")
    return (folder / raw["base_model"]).resolve()


def adapter_state(model: LlamaForCausalLM) -> dict[str, Tensor]:
    """Parameters and buffers a dense checkpoint lacks (priors, routers, transition nets, gates)."""
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if not is_base_parameter(name)
    }


def base_state(model: LlamaForCausalLM) -> dict[str, Tensor]:
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if is_base_parameter(name) and not (tied and name == "lm_head.weight")
    }


def save_model(
    model: LlamaForCausalLM,
    dst: str | Path,
    *,
    base_folder: str | Path | None,
    template_config: dict | None = None,
    tokenizer_from: str | Path | None = None,
) -> Path:
    """Write config + adapter; base weights by reference to `base_folder`, or copied if None."""
    config = model.config
    if config.kind == "hybrid" and base_folder is not None:
        raise ValueError("a hybrid is saved with its full weights (base_folder=None)")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    raw = dict(template_config or {})
    raw.update(
        architectures=[model.architecture],
        model_type="llama",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        max_position_embeddings=config.max_position_embeddings,
    )
    if "rope_parameters" in raw:
        raw["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    else:
        raw["rope_theta"] = config.rope_theta
    raw.pop("base_model", None)
    raw.pop("layer_types", None)
    if config.layer_types:
        raw["layer_types"] = list(config.layer_types)
    if config.routing.kind != "dense":
        raw["routing"] = config.routing_dict()
        save_file(adapter_state(model), dst / ADAPTER_FILE, metadata={"format": "pt"})
    if base_folder is not None:
        raw["base_model"] = os.path.relpath(Path(base_folder).resolve(), dst.resolve())
        for stale in ("model.safetensors", "model.safetensors.index.json"):
            (dst / stale).unlink(missing_ok=True)
    else:
        save_file(base_state(model), dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_from) / name
            if source.is_file() and source.resolve() != (dst / name).resolve():
                shutil.copyfile(source, dst / name)
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    kind: Kind,
    *,
    capacity: float = 0.5,
    threshold: float = 0.5,
    gated_layers: list[int] | None = None,
    score: str = "router",
    seed: int = 0,
    prior_width: int | None = None,
) -> Path:
    """Dense Llama folder `src` → SDT/STT folder `dst` referencing `src` as its base."""
    src = Path(src)
    if kind not in ("sdt", "stt"):
        raise ValueError("convert to 'sdt' or 'stt' (hybrids: `hybrid.hybridize`)")
    raw = json.loads((src / "config.json").read_text())
    if ARCHITECTURES.get(raw.get("architectures", ["?"])[0]) != "dense":
        raise ValueError(f"{src} is not a dense Llama checkpoint")
    base = ModelConfig.from_dict(raw)
    routing = default_routing(kind, base, capacity, threshold, gated_layers, prior_width)
    config = replace(base, routing=replace(routing, score=score))
    torch.manual_seed(seed)
    model = build_model(config)
    load_base_weights(model, read_safetensors_dir(src))
    return save_model(model, dst, base_folder=src, template_config=raw, tokenizer_from=src)


def convert_hybrid(src: str | Path, dst: str | Path, softmax_layers: Sequence[int]) -> Path:
    """Dense Llama folder `src` → hybrid folder `dst` (full weights, `src`'s tokenizer) keeping
    `softmax_layers` softmax, the others Gated DeltaNet initialised from the teacher's attention
    (`distil.assemble`), without training: servable, its quality is not the point (tests,
    capacity and speed benchmarks)."""
    hybrid = assemble(load_model(src), softmax_layers)
    return save_model(hybrid, dst, base_folder=None, tokenizer_from=src)


def install_adapter(adapter: str | Path, base: str | Path, dst: str | Path) -> Path:
    """A shipped routing adapter (config.json + adapter weights) → a servable folder `dst` over
    the dense `base` folder (referenced, not copied; its tokenizer files copied)."""
    adapter, base, dst = Path(adapter), Path(base), Path(dst)
    raw = json.loads((adapter / "config.json").read_text())
    if ARCHITECTURES.get(raw.get("architectures", ["?"])[0]) in (None, "dense"):
        raise ValueError(f"{adapter} holds no SDT/STT routing adapter")
    if not has_base_weights(base):
        raise FileNotFoundError(f"{base} holds no base weights")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter / ADAPTER_FILE, dst / ADAPTER_FILE)
    raw["base_model"] = os.path.relpath(base.resolve(), dst.resolve())
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copyfile(base / name, dst / name)
    return dst


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Any checkpoint this project serves (dense, SDT, STT, hybrid), base and adapter resolved."""
    folder = Path(folder)
    config = ModelConfig.from_folder(folder)
    model = build_model(config)
    load_base_weights(model, read_safetensors_dir(base_folder_of(folder)))
    if config.routing.kind != "dense":
        adapter = load_file(folder / ADAPTER_FILE)
        expected = set(adapter_state(model))
        if set(adapter) != expected:
            raise KeyError(f"adapter mismatch: {sorted(set(adapter) ^ expected)[:5]}")
        with torch.no_grad():
            own = model.state_dict()
            for name, tensor in adapter.items():
                own[name].copy_(tensor)
    return model.to(dtype).eval()


def iter_weights(folder: str | Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of base then adapter, e.g. for a vLLM model's `load_weights`."""
    folder = Path(folder)
    yield from read_safetensors_dir(base_folder_of(folder)).items()
    if (folder / ADAPTER_FILE).is_file():
        yield from load_file(folder / ADAPTER_FILE).items()
