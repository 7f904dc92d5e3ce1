"""The registered optimizers. Update rules come from ``torch.optim`` and ``pytorch_optimizer``;
cramkit only maps its config and tagged parameter groups onto them.

| name | what | source |
| --- | --- | --- |
| ``adamw`` | AdamW, fused on CUDA | torch.optim |
| ``adamw8bit`` | AdamW with block-wise 8-bit moments (4x less optimizer memory) | torchao |
| ``sgd`` | SGD with Nesterov momentum | torch.optim |
| ``lion`` | Lion (Chen et al. 2023), sign of interpolated momentum | pytorch_optimizer |
| ``lamb`` | LAMB (You et al. 2020), Adam with layer-wise trust ratio | pytorch_optimizer |
| ``lars`` | LARS (You et al. 2017), SGD with layer-wise trust ratio | pytorch_optimizer |
| ``muon`` | Muon on hidden matrices + AdamW on embeddings, head and vectors | pytorch_optimizer |
| ``schedulefree`` | Schedule-Free AdamW (Defazio et al. 2024) | pytorch_optimizer |
| ``sam`` | SAM around any of the above (``optim.base``) | see :mod:`.sam` |
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import register_optimizer


@register_optimizer("adamw")
def adamw(groups, cfg, device):
    """AdamW; the fused kernel on CUDA (one launch for all parameters), or as ``optim.fused`` says.

    The fused kernel also takes the ``found_inf`` flag GradScaler uses, which lets the trainer
    skip a step with a non-finite loss without reading the loss on the host.
    """
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "on"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


@register_optimizer("adamw8bit")
def adamw8bit(groups, cfg, device):
    """AdamW whose two moments are stored block-wise quantised to 8 bits (torchao): 2 bytes of
    optimizer state per parameter instead of 8, at the cost of a quantise/dequantise per step.

    torchao compiles its update on first use (seconds), and leaves tensors smaller than 4096
    elements in full precision.
    """
    try:
        from torchao.optim import AdamW8bit
    except ImportError:
        raise ConfigError("optim.name=adamw8bit needs torchao: pip install 'cramkit[fp8]'") from None
    return AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


@register_optimizer("sgd")
def sgd(groups, cfg, device):
    """SGD with Nesterov momentum (plain SGD when ``momentum`` is 0)."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


@register_optimizer("lion")
def lion(groups, cfg, device):
    """Lion with decoupled weight decay; uses ``optim.betas`` (paper default (0.9, 0.99)).

    Its update has unit magnitude per coordinate, so its learning rate is typically 3-10x
    smaller than AdamW's.
    """
    from pytorch_optimizer import Lion

    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decouple=True)


@register_optimizer("lamb")
def lamb(groups, cfg, device):
    """LAMB: the direction r = m / (sqrt(v) + eps) + weight_decay * w, scaled per tensor by the
    trust ratio ||w|| / ||r||.

    The weight decay sits inside r (``weight_decouple=False``) as in You et al. 2020, Alg. 2.
    pytorch_optimizer's LAMB does not bias-correct m and v inside r, and by default divides the
    step by 1 - beta1^t, which makes the first steps up to 10x longer than the paper's
    lr * ||w||; ``adam_debias`` turns that division off. The missing correction inside r only
    shifts the balance between the Adam direction and the decay during the first steps.
    """
    from pytorch_optimizer import Lamb

    for group in groups:
        group.setdefault("adam_debias", True)
    return Lamb(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decouple=False)


@register_optimizer("lars")
def lars(groups, cfg, device):
    """LARS: momentum SGD whose step for each matrix is scaled by
    ``lars_trust * ||w|| / (||g|| + weight_decay * ||w||)``; vectors take plain steps."""
    from pytorch_optimizer import LARS

    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.lars_trust,
                nesterov=cfg.momentum > 0)


@register_optimizer("muon")
def muon(groups, cfg, device):
    """Muon (orthogonalised momentum, Newton-Schulz) on the ``hidden`` groups at ``muon_lr``;
    AdamW at ``lr`` on everything else. One optimizer object, so state and SAM work as usual.

    A group may set ``use_muon`` itself; a Muon group holding a parameter that is not a matrix
    is a ConfigError (orthogonalising a vector is meaningless).
    """
    from pytorch_optimizer import Muon

    for group in groups:
        use_muon = group.setdefault("use_muon", group.get("kind") == "hidden")
        if use_muon:
            bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
            if bad:
                raise ConfigError(
                    f"Muon orthogonalises 2-D hidden matrices only, but its group "
                    f"'{group.get('kind', '?')}' holds parameters of shape {bad[:3]}; put vectors "
                    "(norms, biases, gains) and embeddings in an AdamW group (use_muon=False)"
                )
            group.setdefault("lr", cfg.muon_lr)
            group.setdefault("momentum", cfg.muon_momentum)
        else:
            group.setdefault("lr", cfg.lr)
            group.setdefault("betas", tuple(cfg.betas))
            group.setdefault("eps", cfg.eps)
    return Muon(groups, weight_decouple=True)


@register_optimizer("schedulefree")
def schedulefree(groups, cfg, device):
    """Schedule-Free AdamW. Pair it with ``schedule.name=constant`` (and a short warm-up): the
    averaging replaces the decay. It keeps two weight sequences; the trainer calls its
    ``eval()`` / ``train()`` around validation so that the averaged weights are evaluated.
    A checkpoint's ``model.safetensors`` holds the averaged weights too (what fine-tuning and
    export read; the reference says to checkpoint in eval mode); the training-mode weights go
    into its ``state.pt``, which is what makes resuming exact."""
    from pytorch_optimizer import ScheduleFreeAdamW

    return ScheduleFreeAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
