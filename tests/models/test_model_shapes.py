"""Every combination of the architecture axes builds, runs and returns the documented shapes."""

from __future__ import annotations

import itertools

import pytest
import torch
from model_helpers import VOCAB, mlm_batch, small_config

from cramkit.models import ModelOutput, build_model

AXES = list(
    itertools.product(
        ["pre", "post"], ["layernorm", "rmsnorm"], ["gelu", "glu"],
        ["learned", "sinusoidal", "rotary", "none"], [False, True],
    )
)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt"])
@pytest.mark.parametrize(("norm_position", "norm", "ffn", "positions", "bias"), AXES)
def test_shapes(preset, norm_position, norm, ffn, positions, bias):
    cfg = small_config(
        preset, norm_position=norm_position, norm=norm, ffn=ffn, positions=positions, bias=bias,
        final_norm=norm_position == "pre", type_vocab_size=2 if bias else 0,
    )
    model = build_model(cfg)
    ids, labels = mlm_batch(batch=2, seq_len=10)
    out = model(ids, labels=labels)
    assert isinstance(out, ModelOutput)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    targets = int((labels != -100).sum())
    assert int(out.num_targets) == targets
    if cfg.sparse_prediction:
        assert out.logits.shape == (targets, VOCAB)
    else:
        assert out.logits.shape == (2, 10, VOCAB)
    assert model(ids).logits.shape == (2, 10, VOCAB)
    assert model(ids).loss is None
    assert model.encode(ids).shape == (2, 10, 32)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    assert torch.isfinite(model(ids, labels=labels, attention_mask=mask).loss)
    assert len(model.layers) == 2
    assert model.config is cfg


def test_blocks_expose_branches():
    model = build_model(small_config())
    assert isinstance(model.layers, torch.nn.ModuleList)
    block = model.layers[0]
    for name in ("attn", "ffn", "norm1", "norm2"):
        assert isinstance(getattr(block, name), torch.nn.Module)
    x = torch.randn(2, 5, 32)
    assert block(x, None).shape == x.shape


def test_token_type_ids():
    model = build_model(small_config(type_vocab_size=2)).eval()
    ids, _ = mlm_batch(batch=2, seq_len=8)
    zeros = torch.zeros_like(ids)
    torch.testing.assert_close(model.encode(ids), model.encode(ids, token_type_ids=zeros))
    assert not torch.allclose(model.encode(ids), model.encode(ids, token_type_ids=1 - zeros))


def test_sequence_longer_than_positions_is_an_error():
    from cramkit.errors import ConfigError

    model = build_model(small_config(max_positions=8))
    with pytest.raises(ConfigError, match="exceeds model.max_positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
