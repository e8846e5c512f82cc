"""The corpus split and the perplexity evaluator, on the real data and model."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import torch

from subjective.data.corpus import split_of
from subjective.evaluation.perplexity import perplexity, token_blocks


def test_split_is_deterministic_disjoint_and_about_ten_percent(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    train = set(manifest["splits"]["train"]["documents"])
    validation = set(manifest["splits"]["validation"]["documents"])
    assert train and validation and not train & validation
    assert all(split_of(name) == "validation" for name in validation)
    assert all(split_of(name) == "train" for name in train)
    assert 0.05 < len(validation) / (len(train) + len(validation)) < 0.15
    assert manifest["splits"]["validation"]["tokens"] > 100_000


def test_uniform_logits_give_vocabulary_sized_perplexity():
    vocab = 50
    blocks = token_blocks(list(range(40)), block_size=8, max_tokens=None)
    result = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), blocks, progress=False)
    assert math.isclose(result.perplexity, vocab, rel_tol=1e-6)
    assert result.tokens == 5 * 7


def test_real_model_finds_real_text_far_likelier_than_shuffled(model_dir, data_dir, tmp_path):
    """`subjective eval ppl` end to end, on real and on token-shuffled validation text."""
    text = (data_dir / "validation.txt").read_text()[:6000]
    words = text.split()
    random.Random(0).shuffle(words)
    for name, body in {"real": text, "shuffled": " ".join(words)}.items():
        (tmp_path / f"{name}.txt").write_text(body)

    def ppl(split: str) -> float:
        out = tmp_path / f"{split}.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "subjective.cli",
                "eval",
                "ppl",
                str(model_dir),
                "--data",
                split,
                "--data-dir",
                str(tmp_path),
                "--block-size",
                "256",
                "--max-tokens",
                "1024",
                "--json",
                str(out),
            ],
            check=True,
        )
        record = json.loads(out.read_text())
        assert record["tokens"] == 4 * 255
        return record["perplexity"]

    real, shuffled = ppl("real"), ppl("shuffled")
    assert 1.0 < real < 40.0
    assert shuffled > 3 * real
