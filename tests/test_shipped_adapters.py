"""The committed routing adapters, installed by `make` over the dense base, reproduce the
perplexity `benchmarks/gating_frontier.py` committed for them, at each quality level."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from subjective.evaluation.compute import ComputeTotals, metered_logits_fn
from subjective.evaluation.perplexity import perplexity
from subjective.model_registry.convert import load_model
from subjective.model_registry.layer_states import text_blocks
from tests.processes import REPO

FRONTIER = REPO / "benchmarks" / "results" / "gating_frontier.json"
SHIPPED = {"sdt": "SmolLM2-SDT", "stt": "SmolLM2-STT"}


@pytest.fixture(scope="module")
def frontier() -> dict:
    return json.loads(FRONTIER.read_text())


@pytest.fixture(scope="module")
def validation(frontier: dict, model_dir: Path) -> torch.Tensor:
    spec = frontier["validation"]
    return text_blocks(
        REPO / spec["text"], model_dir, spec["blocks"], spec["block_size"], seed=spec["seed"]
    )


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_adapter_reproduces_its_committed_perplexity(kind, frontier, validation):
    folder = REPO / "models" / SHIPPED[kind]
    if not (folder / "config.json").is_file():
        pytest.fail(f"{folder} is missing: `make test` installs it from adapters/")
    model = load_model(folder).eval()
    routing = model.config.routing
    rows = [
        r for r in frontier["rows"]
        if r["variant"] == kind and r["quality_level"] and r["setting"].endswith("prior, sinks")
    ]  # fmt: skip
    assert {r["quality_level"] for r in rows} == {"conservative", "aggressive"}
    for row in rows:
        assert routing.gated_layers == row["layers"]
        threshold = routing.threshold_for(row["quality_level"])
        assert math.isclose(threshold, row["threshold"], abs_tol=1e-6)
        totals = ComputeTotals(model.config)
        with torch.no_grad():
            got = perplexity(metered_logits_fn(model, threshold, totals), validation, 2, False)
        assert math.isclose(got.perplexity, row["perplexity"], rel_tol=1e-4), row
        summary = totals.summary()
        assert math.isclose(summary["kv_reduction_gated"], row["kv_reduction_gated"], abs_tol=1e-9)
        assert summary["flops"] == row["flops"]
