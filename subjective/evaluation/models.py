"""Load any checkpoint the project serves as a plain PyTorch logits function."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from subjective.evaluation.perplexity import LogitsFn
from subjective.model_registry.config import ARCHITECTURES


def architecture_of(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return config["architectures"][0]


def load_logits_fn(
    model_dir: Path, dtype: torch.dtype = torch.float32, quality: str | None = None
) -> LogitsFn:
    """Dense Llama checkpoints run through transformers (the independent reference); SDT and
    STT through our reference models with their inference routing at `quality`'s threshold
    (None: the base threshold), as decoding would route."""
    architecture = architecture_of(model_dir)
    if architecture == "LlamaForCausalLM":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        return lambda ids: model(input_ids=ids).logits
    if architecture in ARCHITECTURES:
        from subjective.model_registry.convert import load_model

        gated = load_model(model_dir).to(dtype).eval()
        threshold = gated.config.routing.threshold_for(quality)
        return lambda ids: gated(ids, threshold=threshold, logits="all").logits
    raise ValueError(f"{model_dir}: no evaluator for architecture {architecture}")
