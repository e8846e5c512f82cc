"""The resumable state of a training loop (`train`, `hybrid distil`): `OUTPUT/state.pt` holds the
optimizer, the LR schedule, the batch sampler's generator, the step and the loss history, so a
`--resume` continues exactly where a run stopped. One writer and one reader keep both loops'
files in the same format."""

from __future__ import annotations

from pathlib import Path

import torch

STATE_FILE = "state.pt"


def save_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    step: int,
    history: list[dict],
    **run: object,
) -> None:
    """Write the state to `path`; `run` adds what describes the run (its plan or arguments)."""
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "generator": generator.get_state(),
            "step": step,
            "history": history,
            **run,
        },
        path,
    )


def load_training_state(
    path: Path,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> tuple[int, list[dict]]:
    """Restore `optimizer`, `schedule` and `generator` from `path`; return (step, history)."""
    state = torch.load(path, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    generator.set_state(state["generator"])
    return state["step"], state["history"]
