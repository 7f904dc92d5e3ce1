"""BERT-style bidirectional encoder with a masked-LM head (``arch = "bert"``)."""

from __future__ import annotations

from .base import TransformerLM
from .registry import ARCHITECTURES


@ARCHITECTURES.register("bert")
class BertLM(TransformerLM):
    """Bidirectional encoder + MLM head.

    With ``attention_mask`` given, padded keys are hidden from every query; without it, attention
    is unmasked (the fast path). Under ``sparse_prediction`` only the labelled (masked) positions
    go through the head.
    """

    causal = False
