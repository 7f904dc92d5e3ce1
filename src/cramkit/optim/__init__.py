"""Optimizer registry and parameter groups.

Parameter groups follow common practice: no weight decay on norms and biases (any parameter with
fewer than two dimensions), optionally none on embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..configbase import did_you_mean
from ..errors import ConfigError

OptimizerFactory = Callable[[list[dict], "OptimConfig", torch.device], torch.optim.Optimizer]  # noqa: F821
OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        OPTIMIZERS[name] = fn
        return fn

    return deco


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True) -> list[dict]:
    """Split trainable parameters into decayed and non-decayed groups (tied weights counted once)."""
    decay, no_decay, seen = [], [], set()
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or (not decay_embeddings and id(p) in embedding_ids):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


@register_optimizer("adamw")
def _adamw(groups, cfg, device):
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


@register_optimizer("sgd")
def _sgd(groups, cfg, device):
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def build_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """Build the optimizer named in ``cfg.name`` over ``model``'s parameter groups."""
    try:
        factory = OPTIMIZERS[cfg.name]
    except KeyError:
        raise ConfigError(
            f"unknown optimizer '{cfg.name}'{did_you_mean(cfg.name, OPTIMIZERS)}; "
            f"known: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    optimizer = factory(groups, cfg, device)
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return optimizer
