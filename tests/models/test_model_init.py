"""Initialisation schemes: the std of each kind of weight, and the N(0, 1) pitfall."""

from __future__ import annotations

import math

import pytest
import torch
from model_helpers import small_config

from cramkit.models import build_model

# Wide enough that a sample std is within a few percent of the true one.
WIDE = {"vocab_size": 512, "hidden": 128, "heads": 4, "intermediate": 512, "layers": 4}


def _close(value: float, target: float, rel: float = 0.08) -> bool:
    return abs(value - target) <= rel * target


@pytest.mark.parametrize("preset", ["tiny", "bert-base", "tiny-gpt"])
def test_normal_init(preset):
    model = build_model(small_config(preset, init="normal", **WIDE))
    assert _close(model.embeddings.tokens.weight.std().item(), 0.02)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert _close(module.weight.std().item(), 0.02), name
            if module.bias is not None:
                assert module.bias.abs().max().item() == 0.0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1.0), name
            if module.bias is not None:
                assert torch.all(module.bias == 0.0), name
    if model.embeddings.positions is not None and hasattr(model.embeddings.positions, "weight"):
        assert _close(model.embeddings.positions.weight.std().item(), 0.02)


def test_init_std_is_honoured():
    model = build_model(small_config(init="normal", init_std=0.05, **WIDE))
    assert _close(model.embeddings.tokens.weight.std().item(), 0.05)
    assert _close(model.layers[0].attn.qkv.weight.std().item(), 0.05)


def test_torch_default_embedding_is_unit_normal():
    model = build_model(small_config(init="torch-default", **WIDE))
    assert _close(model.embeddings.tokens.weight.std().item(), 1.0)
    # Tied: the decoder keeps the embedding's N(0, 1) rather than a Linear reset.
    assert model.head.decoder.weight is model.embeddings.tokens.weight


def test_gpt2_init_scales_residual_projections():
    model = build_model(small_config("tiny-gpt", init="gpt2", **WIDE))
    scaled = 0.02 / math.sqrt(2 * WIDE["layers"])
    for block in model.layers:
        assert _close(block.attn.out.weight.std().item(), scaled)
        assert _close(block.ffn.down.weight.std().item(), scaled)
        assert _close(block.attn.qkv.weight.std().item(), 0.02)
        assert _close(block.ffn.up.weight.std().item(), 0.02)
    assert _close(model.embeddings.tokens.weight.std().item(), 0.02)


def test_init_weights_resets_a_trained_model():
    model = build_model(small_config(init="normal", **WIDE))
    with torch.no_grad():
        model.embeddings.tokens.weight.fill_(3.0)
    model.init_weights()
    assert _close(model.embeddings.tokens.weight.std().item(), 0.02)
