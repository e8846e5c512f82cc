"""A thin generation loop outside vLLM: prefill, decode with the compacted cache, meter.

It is the reference for what a serving integration must reproduce (same decisions, same
counts) and runs unchanged on a GPU host that has no vLLM (DESIGN.md §11).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from subjective.model_registry.flops import FlopReport, count_flops
from subjective.model_registry.llama import LlamaForCausalLM


@dataclass
class Generation:
    tokens: list[list[int]]  # generated tokens per sequence (EOS included when hit)
    routing: dict[int, Tensor]  # gated layer -> [B, T] full-path mask over processed tokens
    lengths: Tensor  # [B] processed tokens: the prompt and every generated token fed back
    prompt_lens: Tensor  # [B]
    flops: FlopReport


@torch.no_grad()
def generate(
    model: LlamaForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    threshold: float | Tensor | None = None,
    eos_token_id: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Generation:
    """Greedy (or sampled, `temperature > 0`) generation for a batch of token-id prompts."""
    device = model.lm_head.weight.device
    batch = len(prompts)
    prompt_lens = torch.tensor([len(p) for p in prompts])
    if batch == 0 or int(prompt_lens.min()) == 0:
        raise ValueError("every prompt needs at least one token")
    ids = torch.zeros(batch, int(prompt_lens.max()), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, : len(prompt)] = torch.tensor(prompt)
    valid = torch.arange(ids.shape[1])[None, :] < prompt_lens[:, None]
    cache = model.new_cache(batch)
    out = model(
        ids.to(device), valid=valid.to(device), cache=cache, threshold=threshold, logits="last"
    )
    steps = [(out.routing, valid)]
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = out.logits.float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            chosen = logits.argmax(dim=-1).cpu()
        for b in range(batch):
            if not done[b]:
                tokens[b].append(int(chosen[b]))
                done[b] = eos_token_id is not None and int(chosen[b]) == eos_token_id
        if step == max_new_tokens - 1 or done.all():
            break
        feed = ~done[:, None]
        out = model(
            chosen[:, None].to(device),
            valid=feed.to(device),
            cache=cache,
            threshold=threshold,
            logits="last",
        )
        steps.append((out.routing, feed))

    lengths = cache.seq_lens.cpu()
    routing = {}
    for layer in steps[0][0]:
        full = torch.zeros(batch, int(lengths.max()), dtype=torch.bool)
        filled = torch.zeros(batch, dtype=torch.long)
        for decisions, fed in steps:
            for b in range(batch):
                n = int(fed[b].sum())
                full[b, filled[b] : filled[b] + n] = decisions[layer][b, :n].cpu()
            filled += fed.sum(dim=1)
        routing[layer] = full
    report = count_flops(model.config, routing, lengths, prompt_lens)
    return Generation(tokens, routing, lengths, prompt_lens, report)
