"""GPT-style causal decoder with a language-model head (``arch = "gpt"``)."""

from __future__ import annotations

from .base import TransformerLM
from .registry import ARCHITECTURES


@ARCHITECTURES.register("gpt")
class GPTLM(TransformerLM):
    """Causal decoder + LM head.

    Labels come already shifted from the objective (``labels[t]`` is the token after position
    t), so the model does not shift again. Without ``attention_mask`` SDPA runs with
    ``is_causal=True``; with one, causality and padding are combined into one boolean mask.
    """

    causal = True
