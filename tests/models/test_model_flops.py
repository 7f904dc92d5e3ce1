"""Parameter counts and FLOPs per token, checked against figures written out by hand."""

from __future__ import annotations

import pytest
import torch

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
