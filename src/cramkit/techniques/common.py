"""Helpers shared by techniques that build new models from tensors (growth, coalescing)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..distributed.parallel import whole
from ..models import build_model
from ..models.config import ModelConfig


def materialize(config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                device: torch.device | str = "cpu") -> torch.nn.Module:
    """A model of ``config`` holding exactly ``tensors`` (a full state dict).

    Built on the ``meta`` device first, so no random initialisation runs: the global RNG is left
    untouched, which keeps a run that changes its model mid-way exactly resumable.
    """
    with torch.device("meta"):
        model = build_model(config)
    model.to_empty(device=device)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()
    model.load_state_dict(dict(tensors), strict=True)
    return model


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (detached) with every tensor whole.

    Under ``parallel.strategy=fsdp`` the trained model's parameters are DTensor shards; a new
    model is built from the full tensors (and sharded again by the trainer). Gathering is a
    collective, so every rank calls this at the same step, in the same state-dict order.
    """
    return {name: whole(t.detach()) for name, t in model.state_dict().items()}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device
