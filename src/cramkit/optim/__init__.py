"""Optimizer registry, parameter groups and learning-rate scaling with the batch size.

Parameter groups follow common practice: no weight decay on norms and biases (any parameter with
fewer than two dimensions), optionally none on embeddings. Each group carries a ``kind`` tag —
``hidden`` (2-D matrices inside the network), ``embedding`` (input embeddings and the output
projection) or ``vector`` (norms, biases, scalar gains) — so that an optimizer that treats them
differently (Muon orthogonalises only hidden matrices) needs no parameter names. A module whose
weight fuses several matrices by rows declares it with a ``stacked_matrices`` attribute (the fused
``attn.qkv`` has 3, a GLU's ``ffn.up`` 2); the ``hidden`` group lists the count per parameter
under ``stacked``, for an optimizer that treats the parts separately (Muon).

A factory registered with :func:`register_optimizer` receives ``(groups, cfg, device)``. An
optimizer whose update needs a second forward/backward (SAM) sets ``needs_closure = True``; the
trainer then calls ``optimizer.step(closure)`` with a closure that recomputes the loss and
gradients over the same micro-batches. Its ``step(closure)`` returns the closure's loss when it
ran the closure, and where that loss is not finite it leaves the weights and its state as they
were: the trainer then counts a skipped step, as for a non-finite loss of the first pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator

import torch

from ..configbase import did_you_mean
from ..errors import ConfigError, UnknownName
from ..plugins import unknown_hint
from ..utils import add_unique

OptimizerFactory = Callable[[list[dict], "OptimConfig", torch.device], torch.optim.Optimizer]  # noqa: F821
OPTIMIZERS: dict[str, OptimizerFactory] = {}

#: Optimizer state per parameter in fp32-tensor equivalents, for the memory estimate before
#: training (Adam-like rules keep two moments, the default; 8-bit moments are a quarter each).
#: Muon counts as 2, an upper bound: its matrices keep one momentum, its AdamW groups two.
OPTIMIZER_STATES: dict[str, float] = {"sgd": 1, "lion": 1, "lars": 1, "adamw8bit": 0.5}

#: Why an optimizer cannot train on FSDP2's shards, by name, as declared with
#: ``register_optimizer(NAME, whole_tensors=...)``; a run with ``parallel.strategy=fsdp`` that
#: uses one is refused with that reason before anything is built. Names not here run on shards.
WHOLE_TENSORS: dict[str, str] = {}


def keeps_evaluation_weights(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` evaluates other weights than it trains (Schedule-Free's averaged x,
    reached through its ``eval()``); a wrapper says so with ``keeps_evaluation_weights``."""
    flag = getattr(optimizer, "keeps_evaluation_weights", None)
    return callable(getattr(optimizer, "eval", None)) if flag is None else bool(flag)


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Iterator[None]:
    """Inside, ``model``'s parameters are the weights the run is evaluated with; after, exactly
    the training weights they were before. ``eval()`` then ``train()`` alone is two lerps that
    do not round-trip bit for bit, so every evaluation or checkpoint would nudge the training
    weights (a run with checkpoints would not equal one without). Costs one copy of the
    parameters, for such optimizers only.

    The weights are those the optimizer holds: under FSDP2 its shards, while the model may hold
    gathered copies (a forward pass without backward leaves them), which are dropped on both
    sides so that a forward pass gathers the weights as they are then."""
    if not keeps_evaluation_weights(optimizer):
        yield
        return
    from ..distributed.parallel import drop_gathered_parameters

    params = [p for group in optimizer.param_groups for p in group["params"]]
    saved = [p.detach().clone() for p in params]
    optimizer.eval()
    drop_gathered_parameters(model)
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        drop_gathered_parameters(model)


def optimizer_states(cfg: OptimConfig) -> float:  # noqa: F821 - config imports this module
    """fp32 tensors per parameter that ``cfg``'s optimizer holds (see :data:`OPTIMIZER_STATES`).
    SAM holds its base optimizer's state and a copy of the weights to restore after its ascent."""
    states = OPTIMIZER_STATES.get(cfg.rule, 2)
    return states + 1 if cfg.name == "sam" else states
LR_SCALING = ("none", "linear", "sqrt")

log = logging.getLogger("cramkit.optim")


def register_optimizer(name: str, *, whole_tensors: str | None = None
                       ) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: make ``fn(groups, cfg, device) -> Optimizer`` available as ``optim.name=NAME``.

    ``groups`` are :func:`parameter_groups`' (each with its ``weight_decay`` and ``kind`` set);
    ``cfg`` is the run's ``OptimConfig``, whose ``lr`` the trainer rescales every step through
    each group's ``lr``. ``cfg.betas`` and ``cfg.nesterov`` are None unless the user set them:
    the optimizer's own default is then meant. There is no room for options of a new
    optimizer's own (``OptimConfig`` is closed): read the fields that fit, or fix the rest in
    the factory. For the memory estimate before training, set ``OPTIMIZER_STATES[NAME]`` to the
    fp32 tensors it keeps per parameter (2, Adam's, when unset). A name already registered is
    a TypeError: a plugin cannot replace a shipped optimizer unseen.

    Under ``parallel.strategy=fsdp`` the parameters, gradients and states the optimizer sees are
    each rank's shards (DTensors). An update that is elementwise, or that gathers what it needs
    (Muon's Newton-Schulz), runs on them unchanged. One that needs whole tensors of its own (a
    per-matrix norm, a block-wise quantisation) declares why in ``whole_tensors``, e.g. "its
    trust ratio is per whole matrix, and FSDP2 gives each rank a shard of it": such runs are then
    refused up front (:func:`shard_refusal`) instead of failing or computing another update.
    """

    def deco(fn: OptimizerFactory) -> OptimizerFactory:
        add_unique(OPTIMIZERS, name, fn, "optimizer")
        if whole_tensors:
            WHOLE_TENSORS[name] = whole_tensors
        else:  # a name registered anew (a plugin reloaded) keeps no older declaration
            WHOLE_TENSORS.pop(name, None)
        return fn

    return deco


def _output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    # The last Linear registered is the vocabulary (or classifier) projection in every model
    # cramkit builds; a name-free rule keeps this usable for any nn.Module.
    last = None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            last = module
    return last


def parameter_groups(
    model: torch.nn.Module, weight_decay: float, decay_embeddings: bool = True,
    vectors: Iterable[torch.nn.Parameter] = (),
) -> list[dict]:
    """Split trainable parameters into tagged groups (tied weights counted once).

    Returns up to three groups, empty ones dropped, each ``{"params", "weight_decay", "kind"}``:
    ``hidden`` matrices (decayed), ``embedding`` (token/position embeddings and the output
    projection; decayed unless ``decay_embeddings`` is false) and ``vector`` (never decayed):
    tensors of fewer than 2 dimensions, and ``vectors``, scaling vectors stored as matrices (peft's
    IA3 keeps them [out, 1] or [1, in]; decay toward 0 would switch their layers off).
    The ``hidden`` group also has ``stacked``: per parameter, how many matrices its rows stack
    (the owning module's ``stacked_matrices``, 1 where it declares none).
    """
    vector_ids = {id(p) for p in vectors}
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)
    }
    stacked = {
        id(m.weight): int(m.stacked_matrices) for m in model.modules()
        if getattr(m, "stacked_matrices", 1) > 1 and isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    output = _output_layer(model)
    if output is not None:
        embedding_ids.add(id(output.weight))
    kinds: dict[str, list[torch.nn.Parameter]] = {"hidden": [], "embedding": [], "vector": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or id(p) in vector_ids:
            kinds["vector"].append(p)
        elif id(p) in embedding_ids:
            kinds["embedding"].append(p)
        else:
            kinds["hidden"].append(p)
    decay = {
        "hidden": weight_decay,
        "embedding": weight_decay if decay_embeddings else 0.0,
        "vector": 0.0,
    }
    groups = [
        {"params": params, "weight_decay": decay[kind], "kind": kind}
        for kind, params in kinds.items()
        if params
    ]
    for group in groups:
        if group["kind"] == "hidden":
            group["stacked"] = [stacked.get(id(p), 1) for p in group["params"]]
    return groups


def lr_scale(rule: str, batch_size: int, base_batch_size: int) -> float:
    """Multiplier of the learning rate for training at ``batch_size`` instead of the batch the
    learning rate was tuned at: 1 (``none``), the ratio (``linear``, Goyal et al. 2017) or its
    square root (``sqrt``, Krizhevsky 2014; the usual rule for Adam-type optimizers)."""
    if rule not in LR_SCALING:
        raise ConfigError(
            f"optim.lr_scaling: unknown rule '{rule}'{did_you_mean(rule, LR_SCALING)}; "
            f"choose from {', '.join(LR_SCALING)}"
        )
    if rule == "none":
        return 1.0
    if batch_size < 1 or base_batch_size < 1:
        raise ConfigError(
            f"optim.lr_scaling={rule} needs positive batch sizes, got batch {batch_size} and "
            f"optim.base_batch_size {base_batch_size}"
        )
    ratio = batch_size / base_batch_size
    return ratio if rule == "linear" else math.sqrt(ratio)


def get_factory(name: str) -> OptimizerFactory:
    """The registered factory for ``name``; ConfigError with a hint for unknown names."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise UnknownName(
            f"unknown optimizer '{name}'{unknown_hint(name, OPTIMIZERS)}; "
            f"known: {', '.join(sorted(OPTIMIZERS))}"
        ) from None


def whole_tensor_optimizer(cfg) -> tuple[str, str] | None:
    """``(field, name)`` of ``cfg``'s optimizer (an ``OptimConfig``) when its update needs whole
    tensors (:data:`WHOLE_TENSORS`): ``("name", ...)`` for the optimizer named, ``("base", ...)``
    for the one SAM wraps; None when it runs on shards."""
    for which, name in (("name", cfg.name), ("base", cfg.rule)):
        if name in WHOLE_TENSORS:
            return which, name
    return None


def shard_refusal(cfg) -> str | None:
    """Why ``cfg``'s optimizer (an ``OptimConfig``) cannot train under FSDP2, or None where it
    can: the declaration of the optimizer named, or of the one SAM wraps (``optim.base``)."""
    found = whole_tensor_optimizer(cfg)
    if found is None:
        return None
    which, name = found
    shown = f"optim.name={name}" if which == "name" else f"optim.base={name} (which optim.name={cfg.name} wraps)"
    usable = ", ".join(sorted(n for n in OPTIMIZERS if n not in WHOLE_TENSORS))
    return (f"{shown} cannot train under parallel.strategy=fsdp: {WHOLE_TENSORS[name]}; use "
            f"parallel.strategy=ddp, or an optimizer that runs on shards ({usable})")


def build_optimizer(
    model: torch.nn.Module, cfg, device: torch.device, batch_size: int | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer named in ``cfg.name`` over ``model``'s parameter groups.

    With ``cfg.lr_scaling`` other than ``none``, every learning rate (``lr``, ``muon_lr``) is
    scaled by :func:`lr_scale` for ``batch_size`` (the run's final global batch) relative to
    ``cfg.base_batch_size``; the scaled peak is logged and kept as ``optimizer.peak_lr``. Each
    group's ``initial_lr`` is its own peak, which the trainer's schedule multiplies.
    """
    factory = get_factory(cfg.name)
    scale = 1.0
    if cfg.lr_scaling != "none":
        if batch_size is None:
            raise ConfigError(
                f"optim.lr_scaling={cfg.lr_scaling} needs the batch size; pass batch_size= to "
                "build_optimizer"
            )
        scale = lr_scale(cfg.lr_scaling, batch_size, cfg.base_batch_size)
        cfg = dataclasses.replace(cfg, lr=cfg.lr * scale, muon_lr=cfg.muon_lr * scale)
        log.info(
            "optim.lr_scaling=%s: batch %d vs base %d scales the learning rate by %.4g to %.4g",
            cfg.lr_scaling, batch_size, cfg.base_batch_size, scale, cfg.lr,
        )
    groups = parameter_groups(model, cfg.weight_decay, cfg.decay_embeddings)
    optimizer = factory(groups, cfg, device)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    optimizer.peak_lr = cfg.lr
    optimizer.lr_scale = scale
    return optimizer


from . import optimizers  # noqa: E402, F401  (registration)
