"""Perplexity of a causal LM on a text file, in non-overlapping blocks.

Every block of `block_size` tokens is scored on its own (no context carried across blocks), so
`tokens` counts the predicted positions: `block_size - 1` per full block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

# Given input ids [batch, tokens], return logits [batch, tokens, vocab].
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def token_blocks(ids: list[int], block_size: int, max_tokens: int | None) -> torch.Tensor:
    """[num_blocks, block_size] of consecutive tokens; a trailing partial block is dropped."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    usable = len(ids) - len(ids) % block_size
    if usable == 0:
        raise ValueError(f"need at least {block_size} tokens, got {len(ids)}")
    return torch.tensor(ids[:usable], dtype=torch.long).view(-1, block_size)


@torch.inference_mode()
def perplexity(
    logits_fn: LogitsFn, blocks: torch.Tensor, batch_size: int = 4, progress: bool = True
) -> PerplexityResult:
    total_nll = 0.0
    total_tokens = 0
    started = time.perf_counter()
    batches = blocks.split(batch_size)
    for batch in tqdm(batches, desc="perplexity", unit="batch", disable=not progress):
        logits = logits_fn(batch).float()
        targets = batch[:, 1:].to(logits.device)  # the model may run on another device
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    seconds = time.perf_counter() - started
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll), mean_nll=mean_nll, tokens=total_tokens, seconds=seconds
    )


def read_split(data_dir: Path, split: str) -> str:
    path = data_dir / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `subjective data build` first")
    return path.read_text(encoding="utf-8")
