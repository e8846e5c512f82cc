"""Load any checkpoint the project serves as a plain PyTorch logits function."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from subjective.evaluation.perplexity import LogitsFn


def architecture_of(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    return config["architectures"][0]


def load_logits_fn(model_dir: Path, dtype: torch.dtype = torch.float32) -> LogitsFn:
    """Dense Llama checkpoints run through transformers (the independent reference)."""
    architecture = architecture_of(model_dir)
    if architecture == "LlamaForCausalLM":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        return lambda ids: model(input_ids=ids).logits
    raise ValueError(f"{model_dir}: no evaluator for architecture {architecture}")
