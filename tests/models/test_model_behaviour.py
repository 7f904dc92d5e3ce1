"""Model semantics: causality, padding, sparse prediction, tying, rotary, gradients, training."""

from __future__ import annotations

import pytest
import torch
from model_helpers import VOCAB, mlm_batch, small_config

from cramkit.models import build_model
from cramkit.models.layers import Rotary


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("padded", [False, True])
def test_gpt_is_causal(positions, padded):
    model = build_model(small_config("tiny-gpt", positions=positions)).eval()
    ids, _ = mlm_batch(batch=2, seq_len=12)
    mask = torch.ones_like(ids) if padded else None
    before = model(ids, attention_mask=mask).logits
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    after = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_gpt_left_padding_gives_finite_outputs():
    model = build_model(small_config("tiny-gpt")).eval()
    ids, _ = mlm_batch(batch=2, seq_len=8)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    assert torch.isfinite(model(ids, attention_mask=mask).logits).all()


@pytest.mark.parametrize("positions", ["sinusoidal", "learned", "rotary"])
def test_bert_padding_is_invisible(positions):
    model = build_model(small_config(positions=positions)).eval()
    ids, _ = mlm_batch(batch=2, seq_len=10)
    reference = model.encode(ids)
    pad_a = torch.cat([ids, torch.randint(0, VOCAB, (2, 4))], dim=1)
    pad_b = torch.cat([ids, torch.randint(0, VOCAB, (2, 4))], dim=1)
    mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 4)], dim=1).long()
    out_a = model.encode(pad_a, attention_mask=mask)
    out_b = model.encode(pad_b, attention_mask=mask)
    torch.testing.assert_close(out_a[:, :10], reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_b[:, :10], reference, atol=1e-5, rtol=1e-5)


def test_bert_sees_both_directions():
    model = build_model(small_config()).eval()
    ids, _ = mlm_batch(batch=1, seq_len=8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % VOCAB
    assert not torch.allclose(model.encode(ids)[0, 0], model.encode(changed)[0, 0])


@pytest.mark.parametrize("preset", ["tiny", "bert-base"])
def test_sparse_and_dense_prediction_give_the_same_loss(preset):
    sparse = build_model(small_config(preset, sparse_prediction=True, dropout=0.0,
                                      attention_dropout=0.0))
    dense = build_model(small_config(preset, sparse_prediction=False, dropout=0.0,
                                     attention_dropout=0.0))
    dense.load_state_dict(sparse.state_dict())
    ids, labels = mlm_batch(batch=4, seq_len=16, rate=0.25)
    out_sparse, out_dense = sparse(ids, labels=labels), dense(ids, labels=labels)
    torch.testing.assert_close(out_sparse.loss, out_dense.loss)
    assert out_sparse.logits.shape == (int((labels != -100).sum()), VOCAB)
    assert out_dense.logits.shape == (4, 16, VOCAB)
    torch.testing.assert_close(out_sparse.logits, out_dense.logits[labels != -100])
    assert int(out_sparse.num_targets) == int(out_dense.num_targets)


def test_loss_is_mean_cross_entropy_over_targets_without_shift():
    model = build_model(small_config("tiny-gpt"))
    ids, labels = mlm_batch(batch=2, seq_len=9, rate=0.5)
    out = model(ids, labels=labels)
    keep = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, expected)


def test_no_targets_gives_zero_loss():
    model = build_model(small_config())
    ids, _ = mlm_batch()
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and int(out.num_targets) == 0


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt"])
def test_tied_embeddings_share_storage(preset):
    model = build_model(small_config(preset))
    decoder, tokens = model.head.decoder.weight, model.embeddings.tokens.weight
    assert decoder is tokens
    assert decoder.data_ptr() == tokens.data_ptr()
    untied = build_model(small_config(preset, tie_embeddings=False))
    assert untied.head.decoder.weight.data_ptr() != untied.embeddings.tokens.weight.data_ptr()


def test_rotary_scores_depend_only_on_relative_position():
    rotary = Rotary(head_dim=16, max_positions=64)
    q = torch.randn(16).expand(1, 1, 40, 16)
    k = torch.randn(16).expand(1, 1, 40, 16)
    scores = (rotary(q) @ rotary(k).transpose(-1, -2))[0, 0]
    # Same vectors at every position: score[i, j] must be a function of i - j only.
    for shift in (1, 5, 17):
        torch.testing.assert_close(scores[shift:, shift:], scores[:-shift, :-shift],
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(scores[0, 1], scores[0, 5])


def test_rotary_attention_is_shift_invariant():
    cfg = small_config("tiny", positions="rotary")
    attn = build_model(cfg).layers[0].attn.eval()
    x = torch.randn(2, 10, 32)
    at_zero = attn(x)
    # Move the same window to absolute positions 13..22 by shifting the rotary tables.
    shift = 13
    attn.rotary.cos = attn.rotary.cos[shift:].clone()
    attn.rotary.sin = attn.rotary.sin[shift:].clone()
    torch.testing.assert_close(attn(x), at_zero, atol=1e-5, rtol=1e-4)


def test_glu_gates_with_the_second_half_of_up():
    # down(gelu(gate) * value) with up = [value | gate]: with the halves swapped the same
    # saved weights would compute a different function.
    from torch.nn.functional import gelu, linear

    ffn = build_model(small_config("tiny", ffn="glu", activation="gelu", bias=True)).layers[0].ffn
    x = torch.randn(2, 5, 32)
    (w_value, w_gate), (b_value, b_gate) = ffn.up.weight.chunk(2), ffn.up.bias.chunk(2)
    expected = ffn.down(gelu(linear(x, w_gate, b_gate)) * linear(x, w_value, b_value))
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("preset", ["tiny", "bert-base", "tiny-gpt"])
def test_embedding_scale_multiplies_only_the_token_embedding(preset):
    # fairseq's embed_scale: sqrt(hidden) on the token lookup; positions and token types are
    # added unscaled, and a tied decoder reads the table itself.
    cfg = small_config(preset, embedding_scale="sqrt_hidden", embedding_norm=False, dropout=0.0,
                       attention_dropout=0.0)
    model = build_model(cfg).eval()
    emb = model.embeddings
    ids = torch.randint(0, VOCAB, (2, 7))
    tokens, rest = emb.tokens.weight[ids], torch.zeros(7, cfg.hidden)
    if emb.positions is not None:
        rest = rest + emb.positions(7)
    if emb.token_types is not None:
        rest = rest + emb.token_types.weight[0]
    torch.testing.assert_close(emb(ids), tokens * cfg.hidden ** 0.5 + rest)
    if cfg.tie_embeddings and not (cfg.head_transform or cfg.decoder_bias):
        assert model.head.decoder.weight is emb.tokens.weight
        torch.testing.assert_close(model(ids).logits, model.encode(ids) @ emb.tokens.weight.T)
    # The default leaves the lookup as it is.
    plain = build_model(cfg.replace(embedding_scale="none")).embeddings
    plain.load_state_dict(emb.state_dict())
    torch.testing.assert_close(plain(ids), tokens + rest)


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("tiny", {}),
        ("tiny", {"positions": "rotary", "norm": "rmsnorm"}),
        ("bert-base", {"dropout": 0.0, "attention_dropout": 0.0}),
        ("tiny-gpt", {}),
        ("tiny-gpt", {"tie_embeddings": False, "decoder_bias": True, "type_vocab_size": 1}),
    ],
)
def test_gradient_reaches_every_parameter(preset, overrides):
    model = build_model(small_config(preset, **overrides))
    ids, labels = mlm_batch(batch=4, seq_len=16, rate=0.5)
    model(ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt"])
def test_tiny_presets_train(preset):
    from cramkit.models.presets import preset_config

    model = build_model(preset_config(preset))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (8, 32), generator=gen)
    labels = torch.where(torch.rand(8, 32, generator=gen) < 0.25, ids, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(ids, labels=labels).loss
    first.backward()
    opt.step()
    opt.zero_grad()
    second = model(ids, labels=labels).loss
    assert second.item() < first.item()


def test_dropout_only_in_training_mode():
    model = build_model(small_config("bert-base", dropout=0.3, attention_dropout=0.3))
    ids, _ = mlm_batch()
    model.eval()
    torch.testing.assert_close(model.encode(ids), model.encode(ids))
    model.train()
    assert not torch.allclose(model.encode(ids), model.encode(ids))


def test_meta_build_then_materialise_matches_a_direct_build():
    cfg = small_config(positions="sinusoidal")
    direct = build_model(cfg)
    with torch.device("meta"):
        lazy = build_model(cfg)
    lazy.to_empty(device="cpu")
    lazy.init_weights()
    lazy.load_state_dict(direct.state_dict())
    ids, labels = mlm_batch()
    torch.testing.assert_close(lazy(ids, labels=labels).loss, direct(ids, labels=labels).loss)
    assert lazy.head.decoder.weight is lazy.embeddings.tokens.weight


def test_model_output_is_a_pytree_whose_leaves_are_its_tensors():
    """FSDP2/DDP hook backward on the output tensors they find by flattening the output."""
    from torch.utils import _pytree as pytree

    from cramkit.models.base import ModelOutput

    loss, logits, count = torch.tensor(1.0), torch.zeros(2, 3), torch.tensor(4)
    leaves, spec = pytree.tree_flatten(ModelOutput(loss=loss, logits=logits, num_targets=count))
    assert [id(x) for x in leaves] == [id(loss), id(logits), id(count)]
    assert pytree.tree_unflatten(leaves, spec) == ModelOutput(loss, logits, count)
    assert pytree.tree_flatten(ModelOutput(loss=None, logits=logits, num_targets=None))[0] == [logits]


def test_parameters_in_bf16_with_buffers_in_fp32_run_as_fsdp2_casts_them():
    """FSDP2's mixed-precision policy (parallel.fsdp_param_dtype=bf16) casts parameters, not
    buffers: the sinusoidal position table stayed fp32, promoted the embedding sum to fp32, and
    the embedding norm's bf16 weight failed ("mixed dtype (CPU)") at the first forward."""
    from cramkit.models import build_model
    from cramkit.models.presets import preset_config

    model = build_model(preset_config("tiny", vocab_size=256, max_positions=16, positions="sinusoidal"))
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert any(b.dtype == torch.float32 for b in model.buffers())
    ids = torch.randint(5, 256, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(("preset", "positions"),
                         [("tiny", "sinusoidal"), ("tiny", "rotary"), ("tiny-gpt", "learned")])
@pytest.mark.parametrize("stored_once", [False, True])
def test_tied_weights_stay_tied_after_loading_with_assign(preset, positions, stored_once):
    """PyTorch's meta-device idiom, ``load_state_dict(assign=True)``, put a Parameter of its own
    on the decoder (or left it on the meta device when the file stored the table once, as
    cramkit's safetensors files do), so the decoder trained apart from the token table; the
    sinusoidal and rotary tables, in no state dict, stayed on the meta device."""
    cfg = small_config(preset, positions=positions)
    trained = build_model(cfg)
    weights = {k: v.clone() for k, v in trained.state_dict().items()}
    if stored_once:
        del weights["head.decoder.weight"]
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(weights, assign=True)
    assert model.head.decoder.weight is model.embeddings.tokens.weight
    ids, labels = mlm_batch()
    torch.testing.assert_close(model(ids, labels=labels).loss, trained(ids, labels=labels).loss)
    # A plain (copying) strict load of the table stored once is complete too, and stays tied.
    plain = build_model(cfg)
    assert not plain.load_state_dict(weights, strict=True).missing_keys
    assert plain.head.decoder.weight is plain.embeddings.tokens.weight


def test_an_untied_model_loads_its_decoder_as_it_was():
    cfg = small_config(tie_embeddings=False)
    trained = build_model(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(trained.state_dict(), assign=True)
    assert model.head.decoder.weight is not model.embeddings.tokens.weight
    torch.testing.assert_close(model.head.decoder.weight, trained.head.decoder.weight)
    with pytest.raises(RuntimeError, match="head.decoder.weight"):
        build_model(cfg).load_state_dict(
            {k: v for k, v in trained.state_dict().items() if k != "head.decoder.weight"})
