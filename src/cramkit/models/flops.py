"""Parameter counts and training FLOPs per token (docs/references.md's accounting).

``flops_per_token`` is the *training* cost (forward + backward = 6 FLOPs per parameter-token):

    6 * (non-embedding parameters - head + (head + hidden * vocab) * r) + 12 * layers * seq_len * hidden

with ``r`` = the masking rate under sparse prediction and 1 otherwise, and ``head`` the LM
head's parameters other than the decoder weight (BERT 2018's transform, the decoder bias):
sparse prediction runs the whole head on the targets only, not just the decoder. The last term
is the attention score and value matmuls (2 * 2 * L * hidden per token forward, times 3). Causal
models are charged the full L x L attention, not half of it: that is what docs/references.md's
baseline numbers use and what the kernels roughly pay; MFU figures stay comparable between BERT
and GPT.

"Embedding parameters" are the token, position and token-type tables (and the sinusoidal scale),
plus the decoder weight when it is not tied; the decoder's cost enters through its own term.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError
from .config import ModelConfig
from .layers import NORMS, POSITIONS


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    embeddings = getattr(model, "embeddings", None)
    head = getattr(model, "head", None)
    if embeddings is None or head is None:
        return [p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
    params = []
    for name in ("tokens", "positions", "token_types"):
        sub = getattr(embeddings, name, None)
        if sub is not None:
            params.extend(sub.parameters())
    params.append(head.decoder.weight)
    return params


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once).

    With ``non_embedding=True``, leave out the embedding tables and the decoder weight.
    """
    seen = {id(p): p for p in model.parameters()}
    if non_embedding:
        for p in _embedding_parameters(model):
            seen.pop(id(p), None)
    return sum(p.numel() for p in seen.values())


def _built_parameters(factory: Callable[[], nn.Module | None]) -> int:
    # Counted from what the registry builds (on the meta device: no memory, no RNG), so that a
    # registered norm or position variant is counted as it is, not by its name.
    with torch.device("meta"):
        module = factory()
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _norm(cfg: ModelConfig) -> int:
    return _norm_parameters(cfg.norm, cfg.hidden, cfg.norm_eps, cfg.norm_shift)


@functools.lru_cache(maxsize=64)
def _norm_parameters(norm: str, hidden: int, eps: float, shift: bool) -> int:
    # Cached by exactly what make_norm passes its factory: layer dropping counts a block's
    # FLOPs at every step, and building even on the meta device takes ~50 µs of host time.
    return _built_parameters(lambda: NORMS.get(norm)(hidden, eps, shift))


def _linear(fan_in: int, fan_out: int, bias: bool) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _embedding_count(cfg: ModelConfig) -> int:
    h = cfg.hidden
    count = cfg.vocab_size * h + cfg.type_vocab_size * h
    count += _built_parameters(lambda: POSITIONS.get(cfg.positions)(cfg))
    if not cfg.tie_embeddings:
        count += cfg.vocab_size * h
    return count


def _head_count(cfg: ModelConfig) -> int:
    """Parameters of the LM head other than the decoder weight (transform, decoder bias)."""
    count = _linear(cfg.hidden, cfg.hidden, cfg.bias) + _norm(cfg) if cfg.head_transform else 0
    return count + (cfg.vocab_size if cfg.decoder_bias else 0)


def count_parameters_from_config(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """The parameter count that ``cfg`` implies, computed without building the model."""
    h, b = cfg.hidden, cfg.bias
    ffn_inner = cfg.intermediate // 2 if cfg.gated else cfg.intermediate
    block = (
        _linear(h, 3 * h, b)
        + _linear(h, h, b)
        + _linear(h, cfg.intermediate, b)
        + _linear(ffn_inner, h, b)
        + 2 * _norm(cfg)
        + (2 if cfg.residual_scale == "scalar" else 0)
    )
    count = cfg.layers * block
    count += _norm(cfg) * (int(cfg.embedding_norm) + int(cfg.final_norm))
    count += _head_count(cfg)
    if not non_embedding:
        count += _embedding_count(cfg)
    return count


def flops_per_token(cfg: ModelConfig, seq_len: int, mask_rate: float | None = None) -> float:
    """Training FLOPs (forward + backward) per input token at sequence length ``seq_len``.

    ``mask_rate`` (the fraction of positions with a target) is required when
    ``cfg.sparse_prediction`` is on, because the head (transform and decoder) then runs on that
    fraction only.
    """
    if seq_len <= 0:
        raise ConfigError(f"seq_len must be positive, got {seq_len}")
    head = _head_count(cfg)
    on_targets = cfg.hidden * cfg.vocab_size + head  # the whole LM head, decoder matmul included
    if cfg.sparse_prediction:
        if mask_rate is None:
            raise ConfigError(
                "flops_per_token: the model uses sparse prediction, so pass mask_rate (the "
                "fraction of positions with a target, e.g. the MLM masking rate)"
            )
        if not 0.0 <= mask_rate <= 1.0:
            raise ConfigError(f"mask_rate must be in [0, 1], got {mask_rate}")
        on_targets *= mask_rate
    dense = count_parameters_from_config(cfg, non_embedding=True) - head + on_targets
    attention = 12 * cfg.layers * seq_len * cfg.hidden
    return float(6 * dense + attention)
