"""What the two training loops (`train`, `hybrid distil`) share: the optimiser step, and the
resumable state. `OUTPUT/state.pt` holds the optimizer, the LR schedule, the batch sampler's
generator, the step and the loss history, so a `--resume` continues exactly where a run
stopped. One writer and one reader keep both loops' files in the same format."""

from __future__ import annotations

from pathlib import Path

import torch

STATE_FILE = "state.pt"


def optimizer_step(
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """Back-propagate `loss`, clip the gradient norm to 1, step; returns the new learning rate."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    schedule.step()
    return schedule.get_last_lr()[0]


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
