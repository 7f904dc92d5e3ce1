"""Transformer language models: BERT-style masked LM and GPT-style causal LM.

``build_model(cfg)`` builds the architecture named by ``cfg.arch``; ``presets`` holds named shapes
from ``tiny`` (CPU tests) to ``bert-base`` / ``gpt2-small``; ``flops`` counts parameters and
training FLOPs.
"""

from __future__ import annotations

from typing import Any

from . import bert, gpt, init  # noqa: F401  (registration)
from .base import ModelOutput, TransformerLM
from .config import ModelConfig
from .registry import ARCHITECTURES, INITS

__all__ = [
    "ARCHITECTURES",
    "INITS",
    "ModelConfig",
    "ModelOutput",
    "TransformerLM",
    "build_model",
]


def build_model(cfg: ModelConfig | dict[str, Any]) -> TransformerLM:
    """Build (and initialise) the model that ``cfg`` describes.

    ``cfg`` may be a ModelConfig or a dict of its fields (a preset's shape is
    ``presets.preset_config(name)``); anything else is a TypeError. To build without allocating
    memory, use ``with torch.device("meta"): build_model(cfg)``, then
    ``model.to_empty(device=...)`` and ``model.init_weights()``.
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig.from_dict(cfg, path="model")
    if not isinstance(cfg, ModelConfig):  # a preset's name was "'str' object has no attribute 'validate'"
        hint = (f" (a preset: cramkit.models.presets.preset_config({cfg!r}))" if isinstance(cfg, str) else "")
        raise TypeError(f"build_model: give a ModelConfig or a dict of its fields, got {type(cfg).__name__}{hint}")
    cfg.validate()
    return ARCHITECTURES.get(cfg.arch)(cfg)
