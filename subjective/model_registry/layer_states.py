"""What each layer of a dense model sees and does on calibration text: inputs and block updates.

The gated layers' skip-path priors and routers are fitted to these (stage A of the gating
recipe), and the layer-sensitivity ranking gates one layer at a time against them. The text is
read as consecutive token blocks of the train split; nothing here looks at the validation split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from subjective.model_registry.llama import LlamaForCausalLM


@dataclass
class LayerStates:
    """Per layer `i`: `inputs[i]` `[B, T, d]` (the residual stream entering it) and
    `updates[i]` (`Block_i(inputs[i])`, what the layer adds), float32 on the CPU."""

    inputs: list[Tensor]
    updates: list[Tensor]

    @property
    def blocks(self) -> int:
        return self.inputs[0].shape[0]


def text_blocks(
    path: Path, tokenizer_dir: Path, blocks: int, block_size: int, seed: int = 0
) -> Tensor:
    """`[blocks, block_size]` token ids from random offsets of a text file (seeded)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = path.read_text(encoding="utf-8", errors="replace")
    # Read only as much text as the blocks need (about 3 characters per token, 4x spare).
    span = min(len(text), blocks * block_size * 12)
    start = int(torch.randint(0, max(1, len(text) - span), (1,), generator=_gen(seed)))
    ids = torch.tensor(tokenizer.encode(text[start : start + span], add_special_tokens=False))
    if ids.numel() < block_size + 1:
        raise ValueError(f"{path}: fewer than {block_size + 1} tokens")
    offsets = torch.randint(0, ids.numel() - block_size, (blocks,), generator=_gen(seed + 1))
    return torch.stack([ids[o : o + block_size] for o in offsets.tolist()])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def collect_layer_states(model: LlamaForCausalLM, ids: Tensor, batch_size: int = 4) -> LayerStates:
    """Run the dense `model` on `ids` `[B, T]` and keep every layer's input and update."""
    layers = list(model.model.layers)
    inputs: list[list[Tensor]] = [[] for _ in layers]
    outputs: list[list[Tensor]] = [[] for _ in layers]

    def keep(index: int):
        def hook(_module: torch.nn.Module, args: tuple, out: Tensor) -> None:
            inputs[index].append(args[0].float().cpu())
            outputs[index].append(out.float().cpu())

        return hook

    hooks = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        for batch in ids.split(batch_size):
            model(batch.to(model.lm_head.weight.device), logits="none")
    finally:
        for hook in hooks:
            hook.remove()
    ins = [torch.cat(parts) for parts in inputs]
    return LayerStates(ins, [torch.cat(o) - x for o, x in zip(outputs, ins, strict=True)])
