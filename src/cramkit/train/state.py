"""The mutable state of a training run that hooks, logging and checkpoints read."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ..budget import Usage

# Called as transfer(old_model, new_model, old_optimizer, new_optimizer) after a model swap.
Transfer = Callable[[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer, torch.optim.Optimizer], None]


@dataclasses.dataclass
class TrainState:
    """Counters and references shared with techniques.

    ``progress`` is the budget fraction spent (0 → 1); schedules read it, never raw steps.
    """

    usage: Usage = dataclasses.field(default_factory=Usage)
    progress: float = 0.0
    micro_batches: int = 0
    accumulation: int = 1
    lr: float = 0.0
    # Multiplies the scheduled learning rate. The trainer resets it to 1 before on_step_start and
    # techniques multiply in their factor (e.g. a V-cycle's higher rate on a coarse level), so it
    # needs no checkpointing.
    lr_scale: float = 1.0
    # Where the learning-rate schedule is read. The trainer sets it to ``progress`` before
    # on_step_start and a technique may move it (a V-cycle restarting the schedule in each stage);
    # recomputed every step from checkpointed state, so it needs no checkpointing either.
    lr_progress: float = 0.0
    # Set by the trainer before on_step_end: this step spends the budget, so no step follows it
    # in this run. A technique must not change the model then (``request_model``): nothing would
    # train the change, and the final evaluation, checkpoint and summary would describe it. A stop
    # signal does not set it: that run is meant to resume as if uninterrupted, so its checkpoint
    # holds what an uninterrupted run has after the step. Recomputed every step: not checkpointed.
    last_step: bool = False
    loss: float = float("nan")
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    next_eval: float = 0.0
    next_checkpoint: float = 0.0
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    pending_model: tuple[torch.nn.Module, Transfer | None] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def step(self) -> int:
        return self.usage.steps

    @property
    def tokens(self) -> int:
        return self.usage.tokens

    def request_model(self, model: torch.nn.Module, transfer: Transfer | None = None) -> None:
        """Ask the trainer to continue with ``model`` (it rebuilds the optimizer, then calls
        ``transfer`` so a technique can carry optimizer state across). Not on the
        ``last_step``: nothing would train the new model (the trainer warns)."""
        self.pending_model = (model, transfer)

    def counters(self) -> dict[str, Any]:
        return {
            "usage": dataclasses.asdict(self.usage),
            "micro_batches": self.micro_batches,
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "next_eval": self.next_eval,
            "next_checkpoint": self.next_checkpoint,
        }

    def load_counters(self, data: dict[str, Any]) -> None:
        self.usage = Usage(**data["usage"])
        for key in ("micro_batches", "nonfinite_in_row", "nonfinite_total", "next_eval", "next_checkpoint"):
            setattr(self, key, data[key])
