"""LAMB as in its reference implementation: pytorch_optimizer's ``Lamb`` with the reference's
bias correction, no cap on ||w|| and plain Adam steps for the excluded group (``optim.name=lamb``,
registered in :mod:`.optimizers`). Its own module so that importing cramkit does not import
pytorch_optimizer (over a second, with transformers behind it) before a run needs it."""

from __future__ import annotations

import math

import torch
from pytorch_optimizer import Lamb


class ReferenceLamb(Lamb):
    """pytorch_optimizer's ``Lamb`` made to take the steps of the reference implementation
    (tensorflow_addons/optimizers/lamb.py; You et al. 2020, Alg. 2).

    - Bias correction. The reference divides m by 1 - beta1^t and v by 1 - beta2^t inside the
      direction r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w; the library corrects
      neither. Without it the Adam term of r is (1 - beta1^t) / sqrt(1 - beta2^t) times too
      large relative to the decay: with beta2 = 0.999, 3.2-6.5x over the first 100 steps, 2x at
      step 300, 1.3x at 1000 (with 0.98: 0.7-1.5x over the first 50); a plain Adam step
      (``adam=True`` below) would be that much longer too. Since r / c with
      c = sqrt(1 - beta2^t) / (1 - beta1^t) is the library's r with ``eps * sqrt(1 - beta2^t)``
      and ``weight_decay / c``, and the trust ratio cancels the 1/c, :meth:`step` hands the
      library those values (and ``lr * c`` to Adam groups) for the step: the reference's update
      exactly, up to the library's eps in the trust ratio's denominator.
    - No cap on ||w||. The library clamps ||w|| at 10 in the trust ratio, as many PyTorch LAMB
      ports do (``weight_norm.clamp(0, 10)``); the reference and the paper have none. A BERT-base
      matrix already has ||w|| of 15-30 at init (std 0.02), so the cap shrinks exactly the large
      matrices' steps, by up to 3x, and unevenly across shapes: that undoes the layer-wise
      adaptation LAMB exists for, so it is removed.
    - A group with ``adam=True`` takes plain (bias-corrected) Adam steps, no trust ratio: the
      reference's ``exclude_from_layer_adaptation``, which defaults to the variables excluded
      from weight decay (norms and biases). Only those: with ``optim.decay_embeddings=false``
      the embeddings and head, undecayed, keep their trust ratio, where the reference's default
      would exempt them as well.
    """

    clamp = math.inf

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            # The library's other step-size correction (dividing by 1 - beta1^t) would come on
            # top of the one step() folds in.
            group["adam_debias"] = True

    @torch.no_grad()
    def step(self, closure=None):
        """One reference LAMB step (see the class docstring for how the correction is folded)."""
        saved = [(group["lr"], group["eps"], group["weight_decay"]) for group in self.param_groups]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            t = group.get("step", 0) + 1  # the library counts this step when it runs it
            c1, c2 = 1.0 - beta1**t, math.sqrt(1.0 - beta2**t)
            group["eps"] = group["eps"] * c2
            group["weight_decay"] = group["weight_decay"] * c1 / c2
            if group["adam"]:
                group["lr"] = group["lr"] * c2 / c1
        try:
            return super().step(closure)
        finally:  # the schedule, the logs and checkpoints see the configured values
            for group, (lr, eps, weight_decay) in zip(self.param_groups, saved):
                group["lr"], group["eps"], group["weight_decay"] = lr, eps, weight_decay

