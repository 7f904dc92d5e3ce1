"""Weight initialisation schemes (registered in ``INITS``; ``ModelConfig.init`` picks one).

Initialisation decides a lot under a short budget: REFERENCE.md measured the same crammed model at
validation loss 3.95 with N(0, 0.02) and 6.91 with PyTorch's default N(0, 1) embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .layers import ResidualGain
from .registry import INITS


def _normal(model: nn.Module, std: float) -> None:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                if module.weight is not None:
                    module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif hasattr(module, "reset_parameters") and not list(module.children()):
                # Leaf modules with their own parameters (e.g. the sinusoidal scale).
                if any(True for _ in module.parameters(recurse=False)):
                    module.reset_parameters()


@INITS.register("normal")
def init_normal(model: nn.Module) -> None:
    """N(0, init_std) for linear and embedding weights, zero biases, unit norm weights."""
    _normal(model, model.config.init_std)


@INITS.register("gpt2")
def init_gpt2(model: nn.Module) -> None:
    """``normal``, then each residual branch's output projection (``attn.out``, ``ffn.down``)
    drawn with std init_std / sqrt(2 * layers), so the residual stream's variance does not grow
    with depth."""
    cfg = model.config
    _normal(model, cfg.init_std)
    std = cfg.init_std / math.sqrt(2 * cfg.layers)
    with torch.no_grad():
        for block in model.layers:
            block.attn.out.weight.normal_(0.0, std)
            block.ffn.down.weight.normal_(0.0, std)


@INITS.register("torch-default")
def init_torch_default(model: nn.Module) -> None:
    """PyTorch's own defaults (kaiming-uniform linears, N(0, 1) embeddings): the baseline that
    shows why initialisation matters. A tied decoder keeps the embedding's N(0, 1)."""
    decoder = model.head.decoder
    tied = decoder.weight is model.embeddings.tokens.weight
    for module in model.modules():
        if tied and module is decoder:
            continue
        reset = getattr(module, "reset_parameters", None)
        if reset is not None and any(True for _ in module.parameters(recurse=False)):
            reset()
    if tied and decoder.bias is not None:
        # Resetting the decoder would overwrite the shared embedding; do its bias alone, with
        # nn.Linear's own default bound.
        bound = 1.0 / math.sqrt(decoder.in_features)
        with torch.no_grad():
            decoder.bias.uniform_(-bound, bound)


# ---------------------------------------------------------------- inits with requirements


def requires(check):
    """Decorator: attach ``check(cfg)`` (raises ConfigError) to an init scheme, so
    ``ModelConfig.validate`` rejects architectures the scheme was not designed for."""

    def attach(fn):
        fn.check = check
        return fn

    return attach


def _need(cfg, init: str, **wanted) -> None:
    wrong = {k: v for k, v in wanted.items() if getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in wrong)
        want = " ".join(f"model.{k}={v}" for k, v in wrong.items())
        raise ConfigError(f"model.init={init} needs {want} (got {have})")


def _no_norm_check(init: str):
    return lambda cfg: _need(cfg, init, norm="none")


def _set_gains(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for block in model.layers:
            for gain in (block.gain1, block.gain2):
                if isinstance(gain, ResidualGain):
                    gain.weight.fill_(value)


def _untied_decoder(model: nn.Module) -> nn.Linear | None:
    decoder = model.head.decoder
    return None if decoder.weight is model.embeddings.tokens.weight else decoder


@INITS.register("fixup")
@requires(_no_norm_check("fixup"))
def init_fixup(model: nn.Module) -> None:
    """Fixup (Zhang, Dauphin & Ma 2019) for a network without normalisation.

    ``normal``, then in each of the L = 2 * layers residual branches (m = 2 matrices deep:
    qkv → out, up → down) the inner layer is scaled by L^(-1/(2m-2)) = L^(-1/2) and the last
    layer is zeroed, as is an untied output layer; branch gains (if any) start at 1. Each branch
    then contributes nothing at first and its growth is bounded independently of depth.
    """
    cfg = model.config
    _normal(model, cfg.init_std)
    branches, depth = 2 * cfg.layers, 2
    scale = branches ** (-1.0 / (2 * depth - 2))
    with torch.no_grad():
        for block in model.layers:
            block.attn.qkv.weight.mul_(scale)
            block.ffn.up.weight.mul_(scale)
            block.attn.out.weight.zero_()
            block.ffn.down.weight.zero_()
        decoder = _untied_decoder(model)
        if decoder is not None:
            decoder.weight.zero_()
    _set_gains(model, 1.0)


@INITS.register("t-fixup")
@requires(_no_norm_check("t-fixup"))
def init_t_fixup(model: nn.Module) -> None:
    """T-Fixup (Huang et al. 2020): Transformer training without LayerNorm or warm-up.

    Xavier-uniform linears (q, k, v each as its own square matrix), embeddings N(0, d^-1/2)
    scaled by (9N)^(-1/4), then the value and output projections of attention and both
    feed-forward matrices scaled by 0.67 N^(-1/4) (the paper's encoder rule; N = layers).
    """
    cfg = model.config
    _normal(model, cfg.init_std)  # zero biases, unit gains, reset leaf modules
    n, d = cfg.layers, cfg.hidden
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, d ** -0.5).mul_((9 * n) ** -0.25)
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.head.decoder:
                nn.init.xavier_uniform_(module.weight)
        decoder = _untied_decoder(model)
        if decoder is not None:
            nn.init.xavier_uniform_(decoder.weight)
        block_scale = 0.67 * n ** -0.25
        for block in model.layers:
            for part in block.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(part)
            block.attn.qkv.weight[2 * d:].mul_(block_scale)  # the value rows
            block.attn.out.weight.mul_(block_scale)
            block.ffn.up.weight.mul_(block_scale)
            block.ffn.down.weight.mul_(block_scale)
    _set_gains(model, 1.0)


def _rezero_check(cfg) -> None:
    _need(cfg, "rezero", residual_scale="scalar", norm="none")


def _skipinit_check(cfg) -> None:
    _need(cfg, "skipinit", residual_scale="scalar")
    if cfg.norm_position == "post" and cfg.norm != "none":
        raise ConfigError(
            "model.init=skipinit makes each block the identity only when no norm sits on the "
            "residual path: use model.norm_position=pre or model.norm=none"
        )


@INITS.register("rezero")
@requires(_rezero_check)
def init_rezero(model: nn.Module) -> None:
    """ReZero (Bachlechner et al. 2021): no normalisation, each residual branch times a
    learnable scalar that starts at 0, so every block is the identity at initialisation;
    other weights ``normal``."""
    _normal(model, model.config.init_std)
    _set_gains(model, 0.0)


@INITS.register("skipinit")
@requires(_skipinit_check)
def init_skipinit(model: nn.Module) -> None:
    """SkipInit (De & Smith 2020): a learnable scalar at the end of each residual branch,
    starting at 0, so that blocks are the identity at initialisation whatever the
    normalisation; unlike ``rezero`` it keeps (pre-)norms. Other weights ``normal``."""
    _normal(model, model.config.init_std)
    _set_gains(model, 0.0)
