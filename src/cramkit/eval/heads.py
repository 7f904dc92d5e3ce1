"""Sequence classification / regression heads on a cramkit encoder or decoder.

Pooling is a registry: ``cls`` (first token, BERT-style), ``mean`` (average of real tokens) and
``last`` (last non-pad token: the only position that has seen the whole input in a causal model).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..configbase import did_you_mean
from ..errors import ConfigError

Pooler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pool_cls(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first position's state."""
    return hidden[:, 0]


def pool_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-padding positions."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def pool_last(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last non-padding position's state (inputs are right-padded)."""
    last = mask.long().sum(1).clamp(min=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


POOLERS: dict[str, Pooler] = {"cls": pool_cls, "mean": pool_mean, "last": pool_last}


def resolve_pooling(name: str, causal: bool) -> str:
    """The pooling ``name`` stands for: ``auto`` is ``last`` for causal models, ``cls`` otherwise."""
    if name == "auto":
        return "last" if causal else "cls"
    return name


def get_pooler(name: str, causal: bool) -> Pooler:
    """The pooler called ``name``; ``auto`` is ``last`` for causal models and ``cls`` otherwise."""
    if name == "cls" and causal:  # asked for: auto never resolves to it on a causal model
        warnings.warn("finetune.pooling=cls on a causal model pools the first token, which has seen "
                      "nothing but itself; pooling=last (the default for it) or mean reads the whole "
                      "input", stacklevel=2)
    name = resolve_pooling(name, causal)
    try:
        return POOLERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown pooling '{name}'{did_you_mean(name, POOLERS)}; choose from "
            f"{['auto', *POOLERS]}"
        ) from None


class SequenceClassifier(nn.Module):
    """``encoder.encode`` → pool → dense → tanh → dropout → linear to ``num_labels``.

    The dense + tanh "pooler" is BERT's classification setup (width ``hidden``) and cramming's
    (``head_width`` 1024 for its crammed BERT, ``architectures/components.py``); neither drops
    out before the dense layer. The head is named ``classifier`` (not ``head``) so that PEFT's
    ``modules_to_save`` does not also catch the language model's own ``head``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        hidden: int,
        num_labels: int,
        pooling: str = "auto",
        dropout: float = 0.1,
        causal: bool = False,
        head_width: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.pool = get_pooler(pooling, causal)
        width = head_width or hidden
        self.classifier = nn.Sequential(
            nn.Linear(hidden, width),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(width, num_labels),
        )
        # The encoder's language-model head is off the classification path (forward calls
        # ``encode``): its own tensors (BERT's transform and decoder bias, not the decoder weight
        # tied to the embeddings) were counted as trainable and handed to the optimizer, and
        # never got a gradient.
        lm_head = getattr(encoder, "head", None)
        if isinstance(lm_head, nn.Module):
            used = {id(p) for name, p in encoder.named_parameters(remove_duplicate=False)
                    if not name.startswith("head.")}
            for p in lm_head.parameters():
                if id(p) not in used:
                    p.requires_grad_(False)
        std = getattr(getattr(encoder, "config", None), "init_std", 0.02)
        for module in self.classifier:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_labels] (regression: [B, 1])."""
        # No padding in the batch lets the encoder skip the mask and use SDPA's fastest path.
        mask_arg = None if bool(attention_mask.all()) else attention_mask
        hidden = self.encoder.encode(input_ids, mask_arg)
        pooled = self.pool(hidden, attention_mask)
        return self.classifier(pooled)
