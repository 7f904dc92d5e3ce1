"""Contract over the init registry, and each scheme's defining property."""

from __future__ import annotations

import math

import pytest
import torch
from optim_helpers import tiny_run_config, train_and_resume

from cramkit.errors import ConfigError
from cramkit.models import INITS, build_model
from cramkit.models.layers import ResidualGain
from cramkit.models.presets import get_preset

# The architecture options each scheme was designed for (an init with none runs on the preset).
NEEDS = {
    "fixup": ["model.norm=none", "model.residual_scale=scalar"],
    "t-fixup": ["model.norm=none", "model.embedding_scale=sqrt_hidden", "model.ffn=gelu"],
    "rezero": ["model.norm=none", "model.residual_scale=scalar"],
    "skipinit": ["model.residual_scale=scalar"],
}
# Training settings a scheme's authors used where the shared tiny run (Adam at 3e-3, constant,
# no warm-up) differs. Fixup's Transformer was trained with 4000 warm-up updates
# (hongyi-zhang/Fixup, fairseq/run.sh); without one, its zeroed branch outputs grow under Adam
# into a loss spike near step 10 (as they did, a few steps later, with the N(0, 0.02) base).
# T-Fixup's at Adam 5e-4 without warm-up (layer6ai-labs/T-Fixup, Train_IWSLT_TFixup_example.sh);
# at 3e-3 its 10-step validation loss ended from 0.17 below to 0.15 above the start (seeds 0-2).
TRAINING = {"fixup": ["schedule.warmup=0.5"], "t-fixup": ["optim.lr=5e-4"]}
# A configuration each scheme must refuse, with the words the error must contain.
REFUSES = {
    "fixup": (["model.norm=layernorm"],
              "model.init=fixup needs model.norm=none model.residual_scale=scalar"),
    "t-fixup": (["model.norm=rmsnorm"],
                "model.init=t-fixup needs model.norm=none model.embedding_scale=sqrt_hidden"),
    "rezero": (["model.norm=none"], "model.init=rezero needs model.residual_scale=scalar"),
    "skipinit": (["model.residual_scale=scalar", "model.norm_position=post"], "identity only"),
}


def _model(init: str, **options):
    return build_model({**get_preset("tiny"), "vocab_size": 512, "init": init, **options})


@pytest.mark.parametrize("init", INITS.names())
def test_init_trains_and_resumes_exactly(init, tiny_mlm_data, tmp_path):
    summary, full, resumed = train_and_resume(
        tiny_mlm_data, tmp_path, f"model.init={init}", *NEEDS.get(init, []), *TRAINING.get(init, [])
    )
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.01, summary
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("init", INITS.names())
def test_init_misconfiguration_is_a_clear_error(init, tiny_mlm_data, tmp_path):
    with pytest.raises(ConfigError, match="init_std must be positive"):
        tiny_run_config(tiny_mlm_data, tmp_path, f"model.init={init}", "model.init_std=0",
                        *NEEDS.get(init, []))
    if init in REFUSES:
        overrides, message = REFUSES[init]
        with pytest.raises(ConfigError, match=message):
            tiny_run_config(tiny_mlm_data, tmp_path, f"model.init={init}", *overrides)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt"])  # GPT: causal, biases, learned positions
@pytest.mark.parametrize(("init", "options"), [
    ("rezero", {"norm": "none", "residual_scale": "scalar"}),
    ("skipinit", {"residual_scale": "scalar"}),
    ("skipinit", {"residual_scale": "scalar", "norm_position": "post", "norm": "none"}),
])
def test_rezero_and_skipinit_blocks_are_the_identity_at_init(init, options, preset):
    model = build_model({**get_preset(preset), "vocab_size": 512, "init": init, **options})
    x = torch.randn(2, 16, 64)
    for block in model.layers:
        assert torch.equal(block(x), x)
        assert block.gain1.weight.item() == 0.0 and block.gain2.weight.item() == 0.0
    # The gains are trainable: the first step moves them off zero.
    tokens = torch.randint(0, 512, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    assert model.layers[0].gain1.weight.grad.abs().item() > 0


def _xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    return gain * (2.0 / (fan_in + fan_out)) ** 0.5


def _std(weight: torch.Tensor) -> float:
    return weight.std().item()


@pytest.mark.parametrize("ffn", ["gelu", "glu"])
@pytest.mark.parametrize("layers", [2, 8])
def test_fixup_scales_inner_layers_by_branch_count_and_zeroes_branch_outputs(layers, ffn):
    d, intermediate = 128, 512
    wide = {"hidden": d, "intermediate": intermediate, "heads": 4, "layers": layers, "ffn": ffn}
    model = _model("fixup", norm="none", residual_scale="scalar", tie_embeddings=False, **wide)
    # hongyi-zhang/Fixup (multihead_attention_zero.py, transformer_zero.py): Xavier base, with
    # L = all residual branches, the fused in_proj_weight times L^(-1/6), fc1 times L^(-1/2).
    branches = 2 * layers
    inner = intermediate // 2 if ffn == "glu" else intermediate
    for block in model.layers:
        qkv = block.attn.qkv.weight
        assert math.isclose(_std(qkv), _xavier_std(d, 3 * d) * branches ** (-1 / 6), rel_tol=0.08)
        value = block.ffn.up.weight[:inner]
        assert math.isclose(_std(value), _xavier_std(d, inner) * branches ** -0.5, rel_tol=0.08)
        if ffn == "glu":  # the gate stays at Xavier: scaling it too would shrink the branch twice
            assert math.isclose(_std(block.ffn.up.weight[inner:]), _xavier_std(d, inner), rel_tol=0.08)
        assert block.attn.out.weight.abs().max() == 0 and block.ffn.down.weight.abs().max() == 0
        assert block.gain1.weight.item() == 1.0 and block.gain2.weight.item() == 1.0
    assert model.head.decoder.weight.abs().max() == 0  # Fixup zeroes the last (output) layer


def test_t_fixup_scales_value_output_and_ffn_by_depth():
    d, n, inner = 128, 8, 512
    model = _model("t-fixup", norm="none", embedding_scale="sqrt_hidden", ffn="gelu", hidden=d,
                   heads=4, intermediate=inner, layers=n, positions="learned", type_vocab_size=2)
    scale = 0.67 * n ** -0.25
    square = _xavier_std(d, d)
    for block in model.layers:
        q, k, v = block.attn.qkv.weight.chunk(3)
        # fairseq's MultiheadAttention: Xavier gain 1/sqrt(2) for q, k, v; T-Fixup then
        # multiplies v by sqrt(2) * scale (layer6ai-labs/T-Fixup, transformer_layer.py).
        for part in (q, k):
            assert math.isclose(_std(part), square / 2 ** 0.5, rel_tol=0.08)
        assert math.isclose(_std(v), square * scale, rel_tol=0.08)
        assert math.isclose(_std(block.attn.out.weight), square * scale, rel_tol=0.08)
        # fc1, fc2: the branch shrinks by scale^2.
        assert math.isclose(_std(block.ffn.up.weight), _xavier_std(d, inner) * scale, rel_tol=0.08)
        assert math.isclose(_std(block.ffn.down.weight), _xavier_std(inner, d) * scale, rel_tol=0.08)
    embeddings = model.embeddings
    assert math.isclose(_std(embeddings.tokens.weight), d ** -0.5 * (9 * n) ** -0.25, rel_tol=0.08)
    # The reference scales only embed_tokens; other tables keep fairseq's N(0, d^-1/2).
    assert math.isclose(_std(embeddings.positions.weight), d ** -0.5, rel_tol=0.08)
    assert math.isclose(_std(embeddings.token_types.weight), d ** -0.5, rel_tol=0.2)


def test_t_fixup_scales_the_token_embedding_at_the_input_not_at_the_tied_decoder():
    d, n = 256, 8
    model = _model("t-fixup", norm="none", embedding_scale="sqrt_hidden", ffn="gelu", hidden=d,
                   heads=4, intermediate=512, layers=n, positions="none").eval()
    ids = torch.randint(0, 512, (4, 64))
    # fairseq multiplies the (9N)^(-1/4)-scaled N(0, d^-1/2) table by sqrt(d) in the forward
    # pass: the blocks see std (9N)^(-1/4), whatever the width.
    assert math.isclose(_std(model.embeddings(ids)), (9 * n) ** -0.25, rel_tol=0.08)
    # The tied decoder reads the table itself, not the scaled embedding.
    assert model.head.decoder.weight is model.embeddings.tokens.weight
    hidden = model.encode(ids)
    torch.testing.assert_close(model(ids).logits, hidden @ model.embeddings.tokens.weight.T)


def test_schemes_refuse_what_their_reference_lacks():
    with pytest.raises(ConfigError, match="model.init=t-fixup needs model.embedding_scale=sqrt_hidden"):
        _model("t-fixup", norm="none", ffn="gelu")
    # T-Fixup is derived for fc2(act(fc1(x))); a gated branch blew up under it (see the init).
    with pytest.raises(ConfigError, match="t-fixup needs an ungated feed-forward"):
        _model("t-fixup", norm="none", embedding_scale="sqrt_hidden", ffn="glu")
    with pytest.raises(ConfigError, match="model.init=fixup needs model.residual_scale=scalar"):
        _model("fixup", norm="none")


def _markov_tokens(n: int, seq_len: int = 32, vocab: int = 512, seed: int = 1234) -> torch.Tensor:
    """Deterministic text-like token sequences: each token has four likely successors. Synthetic,
    so the test does not depend on the (not bit-reproducible) tokenizer behind the data fixture."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.randint(5, vocab, (vocab, 4), generator=gen)
    out = torch.empty(n, seq_len, dtype=torch.long)
    out[:, 0] = torch.randint(5, vocab, (n,), generator=gen)
    for t in range(1, seq_len):
        out[:, t] = successors[out[:, t - 1], torch.randint(0, 4, (n,), generator=gen)]
    return out


# What each init in the no-norm comparison needs besides norm=none.
_NO_NORM_OPTIONS = {"normal": {}, "t-fixup": {"embedding_scale": "sqrt_hidden"}}


def _adam_losses(init: str, steps: int, lr: float, seed: int = 0) -> list[float]:
    from cramkit.objectives import MaskedLM

    torch.manual_seed(seed)
    model = _model(init, norm="none", ffn="gelu", layers=8, **_NO_NORM_OPTIONS[init])
    objective = MaskedLM({"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}, 512, mask_rate=0.25, seed=seed)
    tokens = _markov_tokens(steps * 16, seed=1234 + seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    losses = []
    for i in range(steps):
        batch = objective(tokens[i * 16:(i + 1) * 16], i * 16)
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_t_fixup_trains_without_norms_where_plain_init_blows_up():
    """8 blocks, no normalisation, ungated feed-forward, Adam at 1e-2 without warm-up, on
    deterministic synthetic text, five seeds: N(0, 0.02) blows up (loss above twice its start)
    in every seed, T-Fixup in at most one. (Measured over ten seeds: plain 10 of 10, 4.1× to
    1e7×; T-Fixup 1 of 10, 3.6×, the others at most 1.46×. Without the sqrt(d) input scale and
    fairseq's q/k gain, T-Fixup blew up in 10 of 10 too, 4.7× to 3e7×.)"""
    def peak(losses: list[float]) -> float:
        return max(losses) / losses[0] if all(math.isfinite(x) for x in losses) else math.inf

    plain = [peak(_adam_losses("normal", 40, 1e-2, seed)) for seed in range(5)]
    tfixup = [peak(_adam_losses("t-fixup", 40, 1e-2, seed)) for seed in range(5)]
    assert sum(p > 2.0 for p in plain) >= 4, plain
    assert sum(p > 2.0 for p in tfixup) <= 1, tfixup


def test_residual_gain_is_a_no_decay_scalar():
    from cramkit.optim import parameter_groups

    model = _model("skipinit", residual_scale="scalar")
    gains = [m.weight for m in model.modules() if isinstance(m, ResidualGain)]
    assert len(gains) == 4
    vector = next(g for g in parameter_groups(model, 0.1) if g["kind"] == "vector")
    assert all(any(g is p for p in vector["params"]) for g in gains)
