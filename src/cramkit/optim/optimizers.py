"""The registered optimizers. Update rules come from ``torch.optim`` and ``pytorch_optimizer``;
cramkit maps its config and tagged parameter groups onto them, and where the library departs from
the paper's reference code (LAMB, Muon on fused matrices) a small subclass brings it back.

``optim.betas`` and ``optim.nesterov`` left unset (``none``) mean each optimizer's own default:
betas :data:`ADAM_BETAS` for the Adam-type rules and :data:`LION_BETAS` for Lion; Nesterov for
SGD and Muon, heavy-ball for LARS.

| name | what | source |
| --- | --- | --- |
| ``adamw`` | AdamW, fused on CUDA | torch.optim |
| ``adamw8bit`` | AdamW with block-wise 8-bit moments (4x less optimizer memory) | torchao |
| ``sgd`` | SGD with Nesterov momentum | torch.optim |
| ``lion`` | Lion (Chen et al. 2023), sign of interpolated momentum | pytorch_optimizer |
| ``lamb`` | LAMB (You et al. 2020), Adam with layer-wise trust ratio; vectors plain Adam | pytorch_optimizer, adjusted |
| ``lars`` | LARS (You et al. 2017), heavy-ball SGD with layer-wise trust ratio | pytorch_optimizer |
| ``muon`` | Muon on hidden matrices (fused ones per part) + AdamW on embeddings, head and vectors | pytorch_optimizer, adjusted |
| ``schedulefree`` | Schedule-Free AdamW (Defazio et al. 2024) | pytorch_optimizer |
| ``sam`` | SAM around any of the above (``optim.base``) | see :mod:`.sam` |

Under ``parallel.strategy=fsdp``, ``lamb``, ``lars`` and ``adamw8bit`` are refused (their
``whole_tensors`` declarations say why); the others take the same steps on FSDP2's shards as on
whole tensors.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from . import register_optimizer

#: The Adam-type rules' betas when ``optim.betas`` is unset: cramming's AdamW betas (Geiping &
#: Goldstein 2023), cramkit's default since its first release.
ADAM_BETAS = (0.9, 0.98)
#: Lion's own betas (Chen et al. 2023; google/automl lion/README.md): Lion's second beta, the
#: momentum's decay, is longer than the first, which only sets the update's interpolation.
LION_BETAS = (0.9, 0.99)


#: The ``optim.*`` settings each shipped optimizer reads besides those every one does (name, lr,
#: weight_decay, decay_embeddings, lr_scaling, base_batch_size); SAM adds its own to its base's.
#: A command-line option outside them is named as ignored. Plugins' optimizers are not listed.
SETTINGS_READ: dict[str, set[str]] = {
    "adamw": {"betas", "eps", "fused"},
    "adamw8bit": {"betas", "eps"},
    "sgd": {"momentum", "nesterov"},
    "lion": {"betas"},
    "lamb": {"betas", "eps"},
    "lars": {"momentum", "nesterov", "lars_trust"},
    "muon": {"betas", "eps", "nesterov", "muon_lr", "muon_momentum"},
    "schedulefree": {"betas", "eps"},
}
COMMON_SETTINGS = {"name", "lr", "weight_decay", "decay_embeddings", "lr_scaling", "base_batch_size"}
SAM_SETTINGS = {"base", "sam_rho", "sam_every", "sam_adaptive"}


def settings_read(cfg) -> set[str] | None:
    """The ``optim.*`` fields the run's optimizer reads (SAM's with its base's), or None for a
    plugin's optimizer, which may read any."""
    if cfg.rule not in SETTINGS_READ:
        return None
    return COMMON_SETTINGS | SETTINGS_READ[cfg.rule] | (SAM_SETTINGS if cfg.name == "sam" else set())


def _betas(cfg, default: tuple[float, float] = ADAM_BETAS) -> tuple[float, float]:
    """``optim.betas`` where the run sets it, else the optimizer's own ``default``."""
    return tuple(cfg.betas) if cfg.betas is not None else default


def _nesterov(cfg, default: bool, momentum: float) -> bool:
    """``optim.nesterov`` where the run sets it, else the optimizer's own ``default``; without
    ``momentum`` there is nothing to look ahead with."""
    return (cfg.nesterov if cfg.nesterov is not None else default) and momentum > 0


@register_optimizer("adamw")
def adamw(groups, cfg, device):
    """AdamW; the fused kernel on CUDA (one launch for all parameters), or as ``optim.fused`` says.

    The fused kernel also takes the ``found_inf`` flag GradScaler uses, which lets the trainer
    skip a step with a non-finite loss without reading the loss on the host.
    """
    fused = device.type == "cuda" if cfg.fused == "auto" else cfg.fused == "on"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=_betas(cfg), eps=cfg.eps, fused=fused)


@register_optimizer("adamw8bit", whole_tensors=(
    "torchao quantises each rank's shard of its moments on its own (a shard under 4096 values "
    "stays in fp32, so the update depends on the number of ranks), and FSDP2's full checkpoints "
    "cannot hold the quantised state, so the run could not resume"))
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
    return AdamW8bit(groups, lr=cfg.lr, betas=_betas(cfg), eps=cfg.eps)


@register_optimizer("sgd")
def sgd(groups, cfg, device):
    """SGD with Nesterov momentum (``optim.nesterov=false``: heavy-ball; plain SGD when
    ``momentum`` is 0)."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=_nesterov(cfg, True, cfg.momentum))


@register_optimizer("lion")
def lion(groups, cfg, device):
    """Lion with decoupled weight decay; betas :data:`LION_BETAS` = (0.9, 0.99), the paper's,
    unless ``optim.betas`` is set.

    Its update has unit magnitude per coordinate, so the paper's advice (google/automl
    lion/README.md) is a learning rate 3-10x smaller than AdamW's and, since the effective decay
    is lr * weight_decay, a weight decay 3-10x larger. ``optim.lr`` and ``optim.weight_decay`` are
    not rescaled for you: set both for Lion.
    """
    from pytorch_optimizer import Lion

    return Lion(groups, lr=cfg.lr, betas=_betas(cfg, LION_BETAS), weight_decouple=True)


@register_optimizer("lamb", whole_tensors=(
    "its trust ratio ||w|| / ||update|| is taken per whole matrix, and FSDP2 gives each rank a "
    "shard of it"))
def lamb(groups, cfg, device):
    """LAMB as in the reference (:class:`.lamb.ReferenceLamb`): the direction
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, scaled per matrix by ||w|| / ||r||; the
    ``vector`` group (norms, biases, gains: no weight decay) takes plain Adam steps.

    The weight decay sits inside r (``weight_decouple=False``) as in You et al. 2020, Alg. 2.
    Without the vector exemption a parameter that starts at zero (a LayerNorm shift, a ReZero
    gain) would move by lr * ||w|| ~ lr^2 per step after its first: it would barely train.
    """
    from .lamb import ReferenceLamb

    for group in groups:
        group.setdefault("adam", group.get("kind") == "vector")
    return ReferenceLamb(groups, lr=cfg.lr, betas=_betas(cfg), eps=cfg.eps, weight_decouple=False)


@register_optimizer("lars", whole_tensors=(
    "its trust ratio ||w|| / ||g|| is taken per whole matrix, and FSDP2 gives each rank a shard "
    "of it"))
def lars(groups, cfg, device):
    """LARS: momentum SGD (heavy-ball, as in You et al. 2017, Alg. 1, and the TF reference's
    ``use_nesterov=False``; ``optim.nesterov=true`` for Nesterov) whose step for each matrix is
    scaled by ``lars_trust * ||w|| / (||g|| + weight_decay * ||w||)``; vectors take plain steps.
    """
    from pytorch_optimizer import LARS

    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.lars_trust,
                nesterov=_nesterov(cfg, False, cfg.momentum))


@register_optimizer("muon")
def muon(groups, cfg, device):
    """Muon (orthogonalised momentum, Newton-Schulz) on the ``hidden`` groups at ``muon_lr``;
    AdamW at ``lr`` on everything else. One optimizer object, so state and SAM work as usual.

    A group may set ``use_muon`` itself; a Muon group holding a parameter that is not a matrix
    is a ConfigError (orthogonalising a vector is meaningless). A Muon group's matrices listed
    as stacked (``stacked``, see :func:`cramkit.optim.parameter_groups`) go to groups of their
    own whose parts :class:`.muon.StackedMuon` orthogonalises separately.
    """
    built = []
    for group in groups:
        stacked = group.pop("stacked", None)
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
            group.setdefault("nesterov", _nesterov(cfg, True, group["momentum"]))
            built += _split_by_blocks(group, stacked or [1] * len(group["params"]))
        else:
            group.setdefault("lr", cfg.lr)
            group.setdefault("betas", _betas(cfg))
            group.setdefault("eps", cfg.eps)
            built.append(group)
    from .muon import StackedMuon

    return StackedMuon(built, weight_decouple=True)


def _split_by_blocks(group: dict, stacked: list[int]) -> list[dict]:
    """``group`` as one group per stacking count (``blocks``), in the order first seen."""
    by_blocks: dict[int, list] = {}
    for p, k in zip(group["params"], stacked, strict=True):
        by_blocks.setdefault(k, []).append(p)
    return [{**group, "params": params, "blocks": k} for k, params in by_blocks.items()]


@register_optimizer("schedulefree")
def schedulefree(groups, cfg, device):
    """Schedule-Free AdamW. Pair it with ``schedule.name=constant`` (and a short warm-up): the
    averaging replaces the decay. It keeps two weight sequences; the trainer calls its
    ``eval()`` / ``train()`` around validation so that the averaged weights are evaluated.
    A checkpoint's ``model.safetensors`` holds the averaged weights too (what fine-tuning and
    export read; the reference says to checkpoint in eval mode); the training-mode weights go
    into its ``state.pt``, which is what makes resuming exact."""
    from pytorch_optimizer import ScheduleFreeAdamW

    return ScheduleFreeAdamW(groups, lr=cfg.lr, betas=_betas(cfg), eps=cfg.eps)


@register_optimizer("sam")
def sam(groups, cfg, device):
    """SAM with radius ``sam_rho`` around ``optim.base`` (any registered optimizer but sam); see
    :mod:`.sam`."""
    from .sam import build_sam

    return build_sam(groups, cfg, device)
