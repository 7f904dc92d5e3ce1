"""The bert-base and gpt2-small layouts map one-to-one onto HF BertForMaskedLM / GPT2LMHeadModel.

This is not the exporter (that lives elsewhere); it pins the parameter layout the exporter relies
on: same tensors, same numerics, same logits.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import VOCAB, mlm_batch, small_config

from cramkit.models import build_model

transformers = pytest.importorskip("transformers")


def _bert_state(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {
        "bert.embeddings.word_embeddings.weight": sd["embeddings.tokens.weight"],
        "bert.embeddings.position_embeddings.weight": sd["embeddings.positions.weight"],
        "bert.embeddings.token_type_embeddings.weight": sd["embeddings.token_types.weight"],
        "bert.embeddings.LayerNorm.weight": sd["embeddings.norm.weight"],
        "bert.embeddings.LayerNorm.bias": sd["embeddings.norm.bias"],
        "cls.predictions.transform.dense.weight": sd["head.transform.dense.weight"],
        "cls.predictions.transform.dense.bias": sd["head.transform.dense.bias"],
        "cls.predictions.transform.LayerNorm.weight": sd["head.transform.norm.weight"],
        "cls.predictions.transform.LayerNorm.bias": sd["head.transform.norm.bias"],
        "cls.predictions.decoder.weight": sd["head.decoder.weight"],
        "cls.predictions.bias": sd["head.decoder.bias"],
        "cls.predictions.decoder.bias": sd["head.decoder.bias"],
    }
    for i in range(model.config.layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[ours + f"attn.qkv.{kind}"].chunk(3, dim=0)
            out[hf + f"attention.self.query.{kind}"] = q
            out[hf + f"attention.self.key.{kind}"] = k
            out[hf + f"attention.self.value.{kind}"] = v
            out[hf + f"attention.output.dense.{kind}"] = sd[ours + f"attn.out.{kind}"]
            out[hf + f"attention.output.LayerNorm.{kind}"] = sd[ours + f"norm1.{kind}"]
            out[hf + f"intermediate.dense.{kind}"] = sd[ours + f"ffn.up.{kind}"]
            out[hf + f"output.dense.{kind}"] = sd[ours + f"ffn.down.{kind}"]
            out[hf + f"output.LayerNorm.{kind}"] = sd[ours + f"norm2.{kind}"]
    return out


def _gpt2_state(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {
        "transformer.wte.weight": sd["embeddings.tokens.weight"],
        "transformer.wpe.weight": sd["embeddings.positions.weight"],
        "transformer.ln_f.weight": sd["final_norm.weight"],
        "transformer.ln_f.bias": sd["final_norm.bias"],
        "lm_head.weight": sd["head.decoder.weight"],
    }
    for i in range(model.config.layers):
        ours, hf = f"layers.{i}.", f"transformer.h.{i}."
        # GPT-2's Conv1D stores weights as [in, out]: the transpose of nn.Linear's.
        for theirs, mine in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.out"),
                             ("mlp.c_fc", "ffn.up"), ("mlp.c_proj", "ffn.down")):
            out[hf + theirs + ".weight"] = sd[ours + mine + ".weight"].t()
            out[hf + theirs + ".bias"] = sd[ours + mine + ".bias"]
        for theirs, mine in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[hf + theirs + ".weight"] = sd[ours + mine + ".weight"]
            out[hf + theirs + ".bias"] = sd[ours + mine + ".bias"]
    return out


def _load(hf_model, state):
    wanted = set(hf_model.state_dict())
    missing = wanted - set(state)
    # Buffers HF keeps for itself (position ids, causal bias tables) are not parameters.
    assert all("position_ids" in k or k.endswith((".attn.bias", ".masked_bias")) for k in missing)
    hf_model.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)


def test_bert_base_layout_matches_hf():
    cfg = small_config("bert-base", dropout=0.0, attention_dropout=0.0)
    ours = build_model(cfg).eval()
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
        hidden_act="gelu", layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, tie_word_embeddings=True,
    )
    hf = transformers.BertForMaskedLM(hf_cfg).eval()
    _load(hf, _bert_state(ours))
    ids, _ = mlm_batch(batch=2, seq_len=10)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-4)


def test_gpt2_small_layout_matches_hf():
    cfg = small_config("tiny-gpt")
    assert (cfg.activation, cfg.norm_eps) == ("gelu_tanh", 1e-5)
    ours = build_model(cfg).eval()
    hf_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=64,
        activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    _load(hf, _gpt2_state(ours))
    ids, _ = mlm_batch(batch=2, seq_len=10)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
