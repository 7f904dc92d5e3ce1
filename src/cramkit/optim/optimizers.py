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

import math

import torch
from pytorch_optimizer import Lamb, Muon
from pytorch_optimizer.optimizer.muon.base import MuonBase, get_adjusted_lr
from pytorch_optimizer.optimizer.utils.matrix import DTensor, has_dtensor

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


@register_optimizer("lamb", whole_tensors=(
    "its trust ratio ||w|| / ||update|| is taken per whole matrix, and FSDP2 gives each rank a "
    "shard of it"))
def lamb(groups, cfg, device):
    """LAMB as in the reference (:class:`ReferenceLamb`): the direction
    r = m_hat / (sqrt(v_hat) + eps) + weight_decay * w, scaled per matrix by ||w|| / ||r||; the
    ``vector`` group (norms, biases, gains: no weight decay) takes plain Adam steps.

    The weight decay sits inside r (``weight_decouple=False``) as in You et al. 2020, Alg. 2.
    Without the vector exemption a parameter that starts at zero (a LayerNorm shift, a ReZero
    gain) would move by lr * ||w|| ~ lr^2 per step after its first: it would barely train.
    """
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


class StackedMuon(Muon):
    """pytorch_optimizer's ``Muon`` that orthogonalises a fused matrix part by part.

    A Muon group with ``blocks=k`` holds matrices whose rows are k matrices of equal height
    stacked (``attn.qkv`` = [q | k | v], a GLU's ``ffn.up`` = [value | gate]). Each part is
    orthogonalised on its own (one batched Newton-Schulz) and gets its own shape factor
    sqrt(max(1, rows / cols)), as when Q, K and V are separate matrices (modded-nanogpt);
    orthogonalising the stack as one matrix would couple the parts' singular vectors and scale
    all of them by the stack's height.

    Under FSDP2 each rank holds a shard of rows of every matrix (a DTensor). Newton-Schulz on a
    shard would orthogonalise another matrix, so each update is gathered whole on every rank,
    orthogonalised (part by part) exactly as without FSDP2, and each rank keeps its own rows: the
    same update as under DDP, at the cost of one all-gather and one whole matrix in memory at a
    time.
    """

    @staticmethod
    def _orthogonalize(group, updates):
        if any(has_dtensor and isinstance(u, DTensor) for u in updates):
            return [_shard_like(StackedMuon._orthogonalize(group, [u.full_tensor()])[0], u) for u in updates]
        blocks = group.get("blocks", 1)
        if blocks == 1:
            return MuonBase._orthogonalize(group, updates)
        out = []
        for update in updates:
            matrix = update.reshape(update.size(0), -1)
            parts = MuonBase._orthogonalize(group, list(matrix.chunk(blocks, dim=0)))
            rows, cols = matrix.shape
            # The library scales the step by the whole stack's shape factor; each part's own
            # is the one a separate matrix would get.
            adjusted = group.get("use_adjusted_lr", False)
            scale = (get_adjusted_lr(1.0, (rows // blocks, cols), adjusted)
                     / get_adjusted_lr(1.0, (rows, cols), adjusted))
            out.append(torch.cat(parts, dim=0).mul_(scale))
        return out


def _shard_like(whole: torch.Tensor, like: DTensor) -> DTensor:
    """``whole`` (the same on every rank) as a DTensor placed like ``like``: each rank's rows."""
    return DTensor.from_local(whole, device_mesh=like.device_mesh).redistribute(placements=like.placements)


@register_optimizer("muon")
def muon(groups, cfg, device):
    """Muon (orthogonalised momentum, Newton-Schulz) on the ``hidden`` groups at ``muon_lr``;
    AdamW at ``lr`` on everything else. One optimizer object, so state and SAM work as usual.

    A group may set ``use_muon`` itself; a Muon group holding a parameter that is not a matrix
    is a ConfigError (orthogonalising a vector is meaningless). A Muon group's matrices listed
    as stacked (``stacked``, see :func:`cramkit.optim.parameter_groups`) go to groups of their
    own whose parts :class:`StackedMuon` orthogonalises separately.
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
