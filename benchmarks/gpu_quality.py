"""Step c of the GPU suite: the gating recipe at GPU scale on the shipped gated models.

Per shipped adapter (a folder with config.json + routing_adapter.safetensors): install it over
the dense base, measure its frontier rows (validation perplexity and the meter's reductions at
its base threshold and quality levels), refit stage A (`skip_fit`, on dense layer states of
more calibration text than a CPU affords), distil stage B (`subjective train --routing router
--teacher DENSE --freeze-base [--bf16]`, steps sized to a time budget and cut by it), measure
the rows again and copy the trained adapter out. Rows carry the fields
`benchmarks/gating_frontier.py` writes (same meter, same perplexity code).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from subjective.evaluation.compute import ComputeTotals, metered_logits_fn
from subjective.evaluation.perplexity import perplexity
from subjective.model_registry import train
from subjective.model_registry.convert import ADAPTER_FILE, install_adapter, load_model
from subjective.model_registry.layer_states import LayerStates, collect_layer_states, text_blocks
from subjective.model_registry.llama import LlamaForCausalLM
from subjective.model_registry.skip_fit import fit_folder

VALIDATION_SEED = 1  # as benchmarks/gating_frontier.py


@dataclass
class QualityRun:
    dense: Path
    adapters: list[Path]
    data: Path
    validation: Path
    work: Path
    ship: Path  # trained adapters land in ship/<adapter name>/
    device: torch.device
    bf16: bool
    calibration_blocks: int = 32
    block_size: int = 512
    stage_a_steps: int = 600
    batch_size: int = 16
    train_block: int = 1024
    time_budget_s: float = 120.0
    tokens_per_s: float = 60_000.0  # stage B estimate (teacher + student); the budget cuts it
    eval_blocks: int = 16


def evaluate(model: LlamaForCausalLM, blocks: torch.Tensor, threshold: float | None) -> dict:
    totals = ComputeTotals(model.config)
    with torch.no_grad():
        result = perplexity(metered_logits_fn(model, threshold, totals), blocks, 4, False)
    return {"perplexity": result.perplexity, **totals.summary()}


def frontier_rows(folder: Path, blocks: torch.Tensor, device: torch.device, stage: str) -> list:
    """Rows at the base threshold and each quality level of the model in `folder`."""
    model = load_model(folder).to(device)
    routing = model.config.routing
    levels = {None: routing.threshold} | {
        level: routing.threshold_for(level) for level in routing.quality_offsets
    }
    rows = [
        {"variant": routing.kind, "layers": routing.gated_layers, "setting": stage,
         "threshold": threshold, "quality_level": level} | evaluate(model, blocks, threshold)
        for level, threshold in levels.items()
    ]  # fmt: skip
    for row in rows:
        print(f"{routing.kind} {stage} t={row['threshold']:.3f}: {row['perplexity']:.3f}")
    return rows


def stage_a(folder: Path, run: QualityRun, states: LayerStates) -> list[dict]:
    return fit_folder(folder, states, steps=run.stage_a_steps, progress=False, device=run.device)


def stage_b_argv(folder: Path, run: QualityRun, output: Path) -> list[str]:
    steps = max(1, int(run.time_budget_s * run.tokens_per_s / (run.batch_size * run.train_block)))
    argv = [
        "train", str(folder), "--data", str(run.data), "--output", str(output),
        "--teacher", str(run.dense), "--freeze-base", "--routing", "router",
        "--steps", str(steps), "--time-budget-s", str(run.time_budget_s),
        "--batch-size", str(run.batch_size), "--block-size", str(run.train_block),
        "--lr", "1e-3", "--save-every", str(steps), "--eval-every", str(steps),
        "--device", run.device.type,
    ]  # fmt: skip
    return argv + (["--bf16"] if run.bf16 else [])


def stage_b(folder: Path, run: QualityRun, output: Path) -> dict:
    """`subjective train` (its parser and handler alone: no server modules needed)."""
    argv = stage_b_argv(folder, run, output)
    parser = argparse.ArgumentParser(prog="subjective")
    train.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.handler(args)
    history = [json.loads(line) for line in (output / "history.jsonl").read_text().splitlines()]
    return {"command": "subjective " + " ".join(argv), "steps_done": history[-1]["step"],
            "last": history[-1]}  # fmt: skip


def ship(folder: Path, target: Path) -> None:
    """Config (without its base reference) and adapter: what `make` installs over the base."""
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / ADAPTER_FILE, target / ADAPTER_FILE)
    raw = json.loads((folder / "config.json").read_text())
    raw.pop("base_model", None)
    (target / "config.json").write_text(json.dumps(raw, indent=2) + "\n")


def improve(adapter: Path, run: QualityRun, states: LayerStates, blocks: torch.Tensor) -> dict:
    folder = install_adapter(adapter, run.dense, run.work / adapter.name)
    rows = frontier_rows(folder, blocks, run.device, "shipped")
    fits = stage_a(folder, run, states)
    trained = stage_b(folder, run, run.work / f"{adapter.name}-stage-b")
    rows += frontier_rows(run.work / f"{adapter.name}-stage-b" / "model", blocks, run.device,
                          "stage A + B at GPU scale")  # fmt: skip
    ship(run.work / f"{adapter.name}-stage-b" / "model", run.ship / adapter.name)
    return {"name": adapter.name, "stage_a": fits, "stage_b": trained, "rows": rows}


def run_quality(run: QualityRun, write: Callable[[dict], None]) -> dict:
    """Every adapter in turn; `write` gets the result after each one (a cut run keeps them)."""
    dense = load_model(run.dense).to(run.device)
    blocks = text_blocks(run.validation, run.dense, run.eval_blocks, run.block_size,
                         seed=VALIDATION_SEED)  # fmt: skip
    ids = text_blocks(run.data, run.dense, run.calibration_blocks, run.block_size)
    result = {
        "dense_row": {"variant": "dense", "setting": "dense"} | evaluate(dense, blocks, None),
        "validation": {"text": str(run.validation), "blocks": run.eval_blocks,
                       "block_size": run.block_size, "seed": VALIDATION_SEED},
        "models": [],
    }  # fmt: skip
    states = collect_layer_states(dense, ids)
    del dense
    write(result)
    for adapter in run.adapters:
        model = improve(adapter, run, states, blocks)
        for row in model["rows"]:
            row["rel_perplexity"] = row["perplexity"] / result["dense_row"]["perplexity"]
        result["models"].append(model)
        write(result)
    return result
