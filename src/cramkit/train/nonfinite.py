"""Skipping optimizer steps whose loss is not finite, without making the host wait for the device.

Reading the loss on the host (``float(loss)``) blocks the Python thread until the GPU has finished
the step, so it can no longer queue the next step's kernels while the GPU works: the GPU idles for
the host's share of every step. torch's fused optimizers (AdamW, Adam, SGD with ``fused=True``)
accept the ``found_inf`` tensor that ``GradScaler`` hands them; where it is 1 the kernel leaves
parameters, moments and the step count untouched. With such an optimizer the decision stays on the
device, and :class:`NonfiniteCounter` keeps the counts there too, to be read only where the trainer
reads numbers anyway (logging, checkpoints, the end of training).

The price is a lag: "too many non-finite steps in a row" is noticed at the next read, up to
``train.log_every - 1`` steps late. Those extra steps were no-ops too (their losses were also
non-finite, or the run of bad steps had already ended), so only the moment of the error moves.
"""

from __future__ import annotations

import torch

from ..errors import TrainingError


def skips_on_device(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    device: torch.device) -> bool:
    """Whether ``optimizer`` can drop a step from a flag on ``device`` (:func:`step_unless`).

    ``_step_supports_amp_scaling`` is how torch marks the fused optimizers for GradScaler. fp16
    loss scaling keeps its own found-inf logic, and an optimizer that recomputes gradients in its
    step (SAM) decides on the host. Every parameter must live on the flag's device: with FSDP2's
    CPU offload the fused kernel runs on the CPU and would read the flag through a non-blocking
    device-to-host copy that nothing waits for, so such runs decide on the host.
    """
    same_device = all(p.device.type == device.type for group in optimizer.param_groups
                      for p in group["params"])
    return (bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and same_device
            and not getattr(optimizer, "needs_closure", False) and not scaler.is_enabled())


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, a no-op where the 0-d device tensor ``skip`` is true.

    The attributes are the ones GradScaler sets for the same purpose (torch/amp/grad_scaler.py);
    gradients are already unscaled, hence ``grad_scale=None``.
    """
    optimizer.grad_scale = None
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


class NonfiniteCounter:
    """Counts of skipped steps, kept on the device between :meth:`settle` calls.

    ``advice`` ends the error that the limit raises (:func:`advice` words it for a run).
    """

    def __init__(self, limit: int, advice: str = "lower optim.lr") -> None:
        self.limit, self.advice = limit, advice
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def record(self, finite: torch.Tensor, state) -> None:
        """Count one step whose loss was ``finite`` (a 0-d bool tensor); no host read."""
        if self._pending is None:
            # torch.full, not torch.tensor(int, device=...): the latter copies a host value to
            # the device and waits for it, the one sync this step would otherwise have.
            start = torch.full((), state.nonfinite_in_row, dtype=torch.long, device=finite.device)
            self._pending = (torch.zeros_like(start), start, start.clone())
        new, in_row, worst = self._pending
        bad = (~finite).long()
        in_row = (in_row + 1) * bad  # a finite step ends the run
        # The longest run since the last read: a run may exceed the limit and end before it.
        self._pending = (new + bad, in_row, torch.maximum(worst, in_row))

    def settle(self, state) -> None:
        """Move the counts into ``state`` (one host read) and stop training if a run of
        non-finite steps reached the limit."""
        if self._pending is None:
            return
        new, in_row, worst = torch.stack(self._pending).tolist()
        self._pending = None
        state.nonfinite_total += new
        state.nonfinite_in_row = in_row
        self.check(max(worst, in_row), state)

    def check(self, in_row: int, state) -> None:
        """Stop training with a TrainingError once ``in_row`` non-finite steps reach the limit."""
        if in_row >= self.limit:
            raise TrainingError(
                f"loss (or, with train.clip_grad, gradient norm) was not finite for {in_row} steps "
                f"in a row (by step {state.step}); {self.advice}"
            )


def advice(clip_grad: float, precision: str) -> str:
    """What to try against repeated non-finite steps under these settings. Every run was told to
    enable clipping and leave fp16, also with clipping on and in fp32 or bf16."""
    tips = ["lower optim.lr"]
    if clip_grad <= 0:
        tips.append("enable train.clip_grad")
    if precision == "fp16":
        tips.append("use train.precision=bf16 instead of fp16")
    return ", ".join(tips[:-1]) + " or " + tips[-1] if len(tips) > 1 else tips[0]
