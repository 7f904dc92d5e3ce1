"""Helpers for the model tests: very small configs that run in milliseconds on CPU."""

from __future__ import annotations

import torch

from cramkit.models.config import ModelConfig
from cramkit.models.presets import get_preset

VOCAB = 97


def small_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """The preset shrunk to vocab 97, hidden 32, 2 layers, 4 heads, intermediate 64."""
    data = get_preset(preset)
    data.update(vocab_size=VOCAB, hidden=32, layers=2, heads=4, intermediate=64, max_positions=64)
    data.update(overrides)
    return ModelConfig.from_dict(data)


def mlm_batch(batch: int = 3, seq_len: int = 12, rate: float = 0.3, seed: int = 0):
    """Random tokens and MLM-style labels (targets on about ``rate`` of positions, at least 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
    picked = torch.rand(batch, seq_len, generator=gen) < rate
    picked[:, 0] = True
    labels = torch.where(picked, ids, torch.full_like(ids, -100))
    return ids, labels


