"""Parameter counts and FLOPs per token, checked against figures written out by hand."""

from __future__ import annotations

import pytest
import torch
from model_helpers import VOCAB, small_config

from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.models.flops import count_parameters, count_parameters_from_config, flops_per_token
from cramkit.models.presets import PRESETS, preset_config

# crammed BERT from docs/references.md, written out from the architecture numbers alone.
V, H, LAYERS, FFN_UP, FFN_DOWN_IN = 32768, 768, 16, 3072, 1536
TOKEN_EMBEDDING = V * H
SINUSOID_SCALE = 1
NORM = 2 * H  # LayerNorm weight and bias (cramming: torch.nn.LayerNorm; no bias on linear layers)
PER_LAYER = (H * 3 * H) + (H * H) + (H * FFN_UP) + (FFN_DOWN_IN * H) + 2 * NORM
CRAMMED_NON_EMBEDDING = NORM + LAYERS * PER_LAYER + NORM  # embedding norm, blocks, final norm
CRAMMED_TOTAL = TOKEN_EMBEDDING + SINUSOID_SCALE + CRAMMED_NON_EMBEDDING  # tied decoder, no bias


def test_crammed_bert_parameter_count():
    assert CRAMMED_TOTAL == 119_589_889
    cfg = preset_config("crammed-bert")
    assert count_parameters_from_config(cfg) == CRAMMED_TOTAL
    assert count_parameters_from_config(cfg, non_embedding=True) == CRAMMED_NON_EMBEDDING
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == CRAMMED_TOTAL
    assert count_parameters(model, non_embedding=True) == CRAMMED_NON_EMBEDDING


def test_gpt2_small_parameter_count():
    # GPT-2 124M with the vocabulary padded to 50304: wte, wpe, 12 blocks with biases, ln_f.
    h, v = 768, 50304
    block = (h * 3 * h + 3 * h) + (h * h + h) + (h * 4 * h + 4 * h) + (4 * h * h + h) + 4 * h
    expected = v * h + 1024 * h + 12 * block + 2 * h
    assert expected == 124_475_904
    assert count_parameters_from_config(preset_config("gpt2-small")) == expected


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tie", [True, False])
def test_analytic_count_matches_the_built_model(name, tie):
    cfg = preset_config(name, tie_embeddings=tie)
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == count_parameters_from_config(cfg)
    assert count_parameters(model, True) == count_parameters_from_config(cfg, True)


def test_crammed_bert_flops_per_token():
    seq_len, mask_rate = 128, 0.25
    decoder = H * V * mask_rate
    attention = 12 * LAYERS * seq_len * H
    expected = 6 * (CRAMMED_NON_EMBEDDING + decoder) + attention
    assert expected == 623_167_488
    assert flops_per_token(preset_config("crammed-bert"), seq_len, mask_rate) == expected


def test_dense_prediction_flops_ignore_mask_rate():
    cfg = preset_config("bert-base")
    base = flops_per_token(cfg, 128)
    assert flops_per_token(cfg, 128, mask_rate=0.15) == base
    expected = 6 * (count_parameters_from_config(cfg, True) + 768 * 32768) + 12 * 12 * 128 * 768
    assert base == expected


def test_sparse_prediction_needs_a_mask_rate():
    with pytest.raises(ConfigError, match="pass mask_rate"):
        flops_per_token(preset_config("crammed-bert"), 128)
    with pytest.raises(ConfigError, match="mask_rate must be in"):
        flops_per_token(preset_config("crammed-bert"), 128, mask_rate=1.5)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny", {}),  # crammed: gated FFN, sparse prediction, tied, no linear biases
        ("tiny", {"sparse_prediction": False}),
        ("tiny", {"ffn": "gelu"}),
        ("tiny", {"tie_embeddings": False}),
        ("tiny", {"positions": "rotary", "residual_scale": "scalar"}),
        ("bert-base", {"dropout": 0.0, "attention_dropout": 0.0}),  # head transform, biases
        ("bert-base", {"dropout": 0.0, "attention_dropout": 0.0, "sparse_prediction": True}),
        ("tiny-gpt", {}),
        ("tiny-gpt", {"tie_embeddings": False, "decoder_bias": True}),
    ],
)
def test_flops_per_token_is_what_a_training_step_multiplies(preset, overrides):
    """The formula against PyTorch's own count of a forward + backward pass. The counter sees
    matrix products only, while the formula charges 6 FLOPs per parameter and token to vectors
    too (biases, norm weights, gains): those are taken out of the formula's figure, and nothing
    else may differ."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_config(preset, **overrides)
    model = build_model(cfg)
    batch, seq_len, targets = 2, 16, 9
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=gen)
    labels = torch.full_like(ids, -100).reshape(-1)
    picked = torch.randperm(batch * seq_len, generator=gen)[:targets]
    labels[picked] = ids.reshape(-1)[picked]
    rate = targets / (batch * seq_len)
    # The math kernel is made of matmuls the counter sees (CPU's fused SDPA kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=labels.view(batch, seq_len)).loss.backward()
    embedding_tables = ("embeddings.tokens.", "embeddings.positions.", "embeddings.token_types.")
    vectors = 0.0
    for name, param in model.named_parameters():
        if param.ndim == 1 and not name.startswith(embedding_tables):
            head_on_targets = name.startswith("head.") and cfg.sparse_prediction
            vectors += param.numel() * (rate if head_on_targets else 1.0)
    expected = flops_per_token(cfg, seq_len, rate if cfg.sparse_prediction else None) - 6 * vectors
    assert counter.get_total_flops() / (batch * seq_len) == pytest.approx(expected, rel=1e-9)


def test_counts_follow_registered_variants(monkeypatch):
    """A new norm, feed-forward or position variant is one registration (ModelConfig's
    docstring): the count from the config must follow what the registries build, not a list of
    the shipped names (a gated variant was counted ungated, a new position table as none, and
    an odd width passed validation for a gated variant other than glu)."""
    from torch import nn

    from cramkit.models.config import ModelConfig
    from cramkit.models.layers import FFNS, NORMS, POSITIONS

    class ScaleAndShift(nn.Module):
        def __init__(self, width, eps, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))
            self.shift = nn.Parameter(torch.zeros(width))

        def forward(self, x):
            return x * self.weight + self.shift

    class Table(nn.Module):
        def __init__(self, cfg):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(cfg.max_positions, cfg.hidden))

        def forward(self, seq_len):
            return self.weight[:seq_len]

    monkeypatch.setitem(NORMS._items, "scaleshift", ScaleAndShift)
    monkeypatch.setitem(FFNS._items, "gated", True)
    monkeypatch.setitem(POSITIONS._items, "table", lambda cfg: Table(cfg))
    cfg = ModelConfig.from_dict({**small_config().to_dict(), "norm": "scaleshift", "ffn": "gated",
                                 "positions": "table"})
    model = build_model(cfg)
    assert count_parameters(model) == count_parameters_from_config(cfg)
    assert count_parameters(model, True) == count_parameters_from_config(cfg, True)
    with pytest.raises(ConfigError, match="ffn=gated splits intermediate"):
        cfg.replace(intermediate=63)
