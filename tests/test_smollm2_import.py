"""The converted HF folder is the GGUF model: same next-token logits on a real prompt."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from subjective.model_registry.smollm2 import gguf_path, load_gguf_model

PROMPT = "The Python standard library provides modules for"


@torch.inference_mode()
def test_converted_logits_match_gguf_loader(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    converted = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference = load_gguf_model(gguf_path(install=False)).eval()
    assert reference.dtype == torch.float32

    ours = converted(input_ids=ids).logits[0, -1]
    theirs = reference(input_ids=ids).logits[0, -1]
    assert (ours - theirs).abs().max().item() < 1e-3
    assert ours.argmax().item() == theirs.argmax().item()
    # A real language model, not random weights: the continuation is a plausible word.
    assert tokenizer.decode(ours.argmax()).strip().isalpha()


def test_converted_folder_is_plain_hf_format(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (model_dir / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
