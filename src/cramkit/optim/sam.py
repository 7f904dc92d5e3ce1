"""Sharpness-Aware Minimization (Foret et al. 2021) around any registered optimizer.

``optim.name=sam optim.base=adamw``: the gradient g at w gives the ascent point
``w + rho * g / ||g||`` (ASAM with ``sam_adaptive``: scaled by w² elementwise); the gradient
there drives the base optimizer's update of w. The perturb/restore logic is pytorch_optimizer's
``SAM``; cramkit adds a base optimizer built from its own registry (so Muon or LAMB work as
bases) and ``sam_every``: the sharpness-aware step every k steps, a plain base step otherwise,
which cuts SAM's ~2x cost to ~(1 + 1/k)x.

ASAM's operator is T_w = |w| (davda54/sam's ``adaptive=True``), not the ASAM authors'
|w| + eta with eta = 0.01 on weights and no scaling of biases (SamsungLabs/ASAM): a parameter at
0 (a bias, a norm's shift, a ReZero gain at initialisation) is not perturbed. ASAM's radius is
on another scale: Kwon et al. 2021 use rho = 0.5 on CIFAR-10 where SAM uses 0.05, so set
``sam_rho`` for it.

Under data parallelism (DDP, FSDP) the first pass's gradient is already averaged over all ranks
when the ascent point is computed, so the perturbation is the same on every rank and measures the
sharpness of the global batch. The paper's m-sharpness (each device perturbing with its own
micro-batch's gradient, m = the per-device batch) would need the first pass without gradient
synchronisation; cramkit does not do that, so ``sam_rho`` tuned per device in the paper's
setting may not transfer. Under FSDP2 ||g|| is the norm over every rank's shard, the whole
model's, so the ascent point is the one DDP computes.
"""

from __future__ import annotations

import torch
from pytorch_optimizer import SAM as _LibrarySAM
from pytorch_optimizer.base.exception import NoClosureError

from ..distributed.parallel import whole
from ..errors import ConfigError
from . import get_factory, keeps_evaluation_weights


class SAM(_LibrarySAM):
    """SAM whose base optimizer comes from a factory, applied every ``every`` steps.

    ``needs_closure`` tells the trainer to call ``step(closure)``; the closure must zero the
    gradients and recompute loss and gradients over the same batch. The step counter lives in the
    first parameter group (``sam_step``), so ``state_dict()`` carries it and resuming is exact.

    A non-finite loss at the ascent point (the closure's) would put NaN or inf into the update,
    so the step then restores the weights and leaves the base optimizer and the counter
    untouched, and returns that loss for the trainer to count as a skipped step.
    """

    needs_closure = True

    def __init__(self, groups, base_factory, rho: float = 0.05, adaptive: bool = False,
                 every: int = 1) -> None:
        if every < 1:
            raise ConfigError(f"optim.sam_every must be >= 1, got {every}")
        self.every = every
        super().__init__(groups, base_optimizer=base_factory, rho=rho, adaptive=adaptive)

    @torch.no_grad()
    def step(self, closure=None):
        """One update; the ascent step and the closure's second pass run every ``every``-th
        call, otherwise the base optimizer steps on the gradients already present."""
        group = self.param_groups[0]
        count = group.get("sam_step", 0)
        group["sam_step"] = count + 1
        if count % self.every:
            return self.base_optimizer.step()
        if closure is None:
            raise NoClosureError(str(self))
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
            self._restore()
            group["sam_step"] = count  # a skipped step, as if it had not been taken
            return loss
        self.second_step()  # restores w and steps the base optimizer
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save w and move to the ascent point w + rho * e / ||e|| (e = g, or |w| g for ASAM,
        whose step is then scaled by w² elementwise), ||e|| over all parameters.

        The library's version combines the per-parameter norms with in-place arithmetic, which
        FSDP2's shards (DTensors, whose norms are partial sums over ranks) refuse; torch's
        total norm reduces them over the ranks, so ||e|| is the whole model's, as without FSDP2,
        and the rest is elementwise.
        """
        parts = [p.grad * p.abs() if group["adaptive"] else p.grad
                 for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = whole(torch.nn.utils.get_total_norm(parts)) if parts else torch.zeros(())
        norm = norm + self.perturb_eps
        for group in self.param_groups:
            scale = group["rho"] / norm
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.clone()
                step = p.grad * scale.to(p.dtype)
                p.add_(step * p.square() if group["adaptive"] else step)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Back to the saved w, then the base optimizer's step with the ascent point's gradient
        (a per-parameter copy: the library's batched one has no DTensor rule)."""
        self._restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _restore(self) -> None:
        """Put back the weights saved before the ascent step, without an update."""
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state[p].pop("old_p", None)
                if old is not None:
                    p.copy_(old)

    @property
    def keeps_evaluation_weights(self) -> bool:
        """True when the base optimizer evaluates other weights than it trains (Schedule-Free)."""
        return keeps_evaluation_weights(self.base_optimizer)

    def train(self) -> None:
        """Forward a training-mode switch to a base that has one (Schedule-Free)."""
        getattr(self.base_optimizer, "train", lambda: None)()

    def eval(self) -> None:
        """Forward an evaluation-mode switch to a base that has one (Schedule-Free)."""
        getattr(self.base_optimizer, "eval", lambda: None)()


def build_sam(groups, cfg, device) -> SAM:
    """SAM with radius ``sam_rho`` around ``optim.base`` (any registered optimizer but sam): the
    factory behind ``optim.name=sam``, which :mod:`.optimizers` registers so that importing
    cramkit does not import pytorch_optimizer."""
    if cfg.base == "sam":
        raise ConfigError("optim.base=sam: SAM cannot wrap itself; choose e.g. optim.base=adamw")
    base = get_factory(cfg.base)

    def build_base(param_groups):
        return base(param_groups, cfg, device)

    return SAM(groups, build_base, rho=cfg.sam_rho, adaptive=cfg.sam_adaptive,
               every=cfg.sam_every)
