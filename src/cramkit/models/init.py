"""Weight initialisation schemes (registered in ``INITS``; ``ModelConfig.init`` picks one).

Initialisation decides a lot under a short budget: REFERENCE.md measured the same crammed model at
validation loss 3.95 with N(0, 0.02) and 6.91 with PyTorch's default N(0, 1) embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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
