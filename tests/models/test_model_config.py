"""ModelConfig validation messages and the presets."""

from __future__ import annotations

import pytest
import torch

from cramkit.config import load_config
from cramkit.errors import ConfigError
from cramkit.models import ModelConfig, build_model
from cramkit.models.flops import count_parameters
from cramkit.models.presets import PRESETS, get_preset, preset_config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden": 100, "heads": 12}, r"hidden \(100\) must be divisible by heads \(12\)"),
        ({"ffn": "glu", "intermediate": 3071}, "intermediate must be even"),
        ({"positions": "rotary", "hidden": 36, "heads": 12}, "head dim .* must be even"),
        ({"layers": 0}, "layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"attention_dropout": -0.1}, r"attention_dropout must be in \[0, 1\)"),
        ({"arch": "brt"}, "unknown architecture 'brt' \\(did you mean 'bert'\\?\\)"),
        ({"init": "gpt-2"}, "unknown init scheme 'gpt-2' \\(did you mean 'gpt2'\\?\\)"),
        ({"norm": "rms"}, "unknown norm 'rms' \\(did you mean 'rmsnorm'\\?\\)"),
        ({"positions": "rope"}, "unknown positions 'rope' \\(a plugin's is found once CRAMKIT_PLUGINS names its module\\); choose from"),
        ({"activation": "relu"}, "unknown activation 'relu'"),
        ({"document_mask_kernel": "flash"}, "unknown document mask kernel 'flash'"),
        ({"embedding_scale": "sqrt"}, "unknown embedding scale 'sqrt' \\(a plugin's is found once CRAMKIT_PLUGINS.*; choose from"),
        ({"type_vocab_size": -1}, "type_vocab_size must be >= 0"),
        ({"norm_eps": 0.0}, "norm_eps must be positive"),
        ({"init_std": 0.0}, "init_std must be positive"),
        ({"hiden": 768}, "unknown config key 'hiden' \\(did you mean 'hidden'\\?\\)"),
    ],
)
def test_validate_rejects_bad_configs(changes, message):
    data = get_preset("crammed-bert")
    data.update(changes)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data)


def test_validate_runs_on_replace_and_build():
    cfg = preset_config("tiny")
    with pytest.raises(ConfigError, match="divisible"):
        cfg.replace(heads=5)
    bad = ModelConfig(hidden=64, heads=5)
    with pytest.raises(ConfigError, match="divisible"):
        build_model(bad)


def test_build_model_and_from_dict_name_arguments_of_the_wrong_kind():
    """A preset's name given to build_model was "'str' object has no attribute 'validate'", and
    a key that is not a string in from_dict's dict "'int' object has no attribute 'lower'"."""
    with pytest.raises(TypeError, match=r"give a ModelConfig or a dict of its fields, got str \(a preset: "
                                        r"cramkit.models.presets.preset_config\('tiny'\)\)"):
        build_model("tiny")
    with pytest.raises(TypeError, match="got NoneType$"):
        build_model(None)
    with pytest.raises(ConfigError, match="ModelConfig: option names are strings, got 1"):
        ModelConfig.from_dict({1: 2})
    with pytest.raises(ConfigError, match="model: option names are strings, got 1"):
        build_model({1: 2})


def test_defaults_are_crammed_bert():
    # All but norm_bias: its default (none: follow model.bias) keeps configs saved before it
    # existed building what they trained; the preset sets cramming's shift explicitly.
    assert ModelConfig().to_dict() == {**get_preset("crammed-bert"), "norm_bias": None}


def test_config_round_trips_through_dict():
    cfg = preset_config("gpt2-small")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert build_model(preset_config("tiny").to_dict()).config == preset_config("tiny")


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="did you mean 'crammed-bert'"):
        get_preset("crammed_bert")


def test_get_preset_returns_a_copy():
    get_preset("tiny")["hidden"] = 1
    assert PRESETS["tiny"]["hidden"] == 64


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name):
    cfg = preset_config(name)
    assert set(get_preset(name)) == set(ModelConfig().to_dict()), "presets list every field"
    if name.startswith("tiny"):
        model = build_model(cfg)
    else:
        with torch.device("meta"):
            model = build_model(cfg)
    assert len(model.layers) == cfg.layers
    assert model.config.arch == cfg.arch


def test_crammed_bert_is_the_reference_architecture():
    cfg = preset_config("crammed-bert")
    assert (cfg.arch, cfg.layers, cfg.hidden, cfg.heads) == ("bert", 16, 768, 12)
    assert (cfg.ffn, cfg.intermediate) == ("glu", 3072)
    assert (cfg.norm_position, cfg.final_norm, cfg.embedding_norm) == ("pre", True, True)
    assert not cfg.bias and not cfg.decoder_bias and not cfg.head_transform
    assert cfg.positions == "sinusoidal" and cfg.tie_embeddings and cfg.sparse_prediction
    assert (cfg.vocab_size, cfg.dropout, cfg.attention_dropout, cfg.norm_eps) == (
        32768, 0.0, 0.0, 1e-12)
    assert cfg.type_vocab_size == 0 and cfg.init == "normal" and cfg.init_std == 0.02
    with torch.device("meta"):
        model = build_model(cfg)
    block = model.layers[0]
    assert tuple(block.ffn.up.weight.shape) == (3072, 768)
    assert tuple(block.ffn.down.weight.shape) == (768, 1536)
    # No linear layer has a bias; the LayerNorms keep theirs, as cramming's torch.nn.LayerNorm do.
    biases = [name for name, _ in model.named_parameters() if name.endswith("bias")]
    assert biases and all(".norm" in n or n.startswith("final_norm") for n in biases), biases
    assert len(biases) == 2 * 16 + 2  # norm1 and norm2 per block, the embedding and final norms
    # cramming's crammed_bert.py counted layer by layer (vocabulary 32768, tied decoder, the
    # sinusoid's one learned scale): 25,165,824 + 1 + 1,536 + 16 x 5,901,312 + 1,536.
    assert count_parameters(model) == 119_589_889


def test_hf_shaped_presets():
    bert = preset_config("bert-base")
    assert (bert.norm_position, bert.bias, bert.ffn, bert.activation) == (
        "post", True, "gelu", "gelu")
    assert (bert.positions, bert.max_positions, bert.type_vocab_size) == ("learned", 512, 2)
    assert bert.head_transform and bert.decoder_bias and not bert.sparse_prediction
    assert not bert.final_norm and bert.embedding_norm and bert.norm_eps == 1e-12
    assert bert.dropout == bert.attention_dropout == 0.1
    gpt = preset_config("gpt2-small")
    assert (gpt.arch, gpt.vocab_size, gpt.max_positions, gpt.norm_eps) == (
        "gpt", 50304, 1024, 1e-5)
    assert (gpt.activation, gpt.init, gpt.norm_position, gpt.final_norm) == (
        "gelu_tanh", "gpt2", "pre", True)
    assert gpt.bias and gpt.tie_embeddings and not gpt.embedding_norm and gpt.dropout == 0.0


def test_a_registered_variant_is_selectable_by_config_and_used(monkeypatch):
    """A new norm is one registration: the config accepts its name and every block builds it."""
    from torch import nn

    from cramkit.models.layers import NORMS

    class Scale(nn.Module):
        def __init__(self, width, eps, bias):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(width))

        def forward(self, x):
            return x * self.weight

    monkeypatch.setitem(NORMS._items, "scale", Scale)
    cfg = ModelConfig.from_dict({**get_preset("tiny"), "norm": "scale"})
    model = build_model(cfg)
    assert all(isinstance(block.norm1, Scale) and isinstance(block.norm2, Scale) for block in model.layers)
    assert model(torch.randint(0, cfg.vocab_size, (1, 8))).logits.isfinite().all()


def test_none_on_the_command_line_names_the_none_variant():
    cfg = load_config("demo", ["model.norm=none", "model.init=t-fixup", "model.positions=none",
                               "model.embedding_scale=sqrt_hidden", "model.ffn=gelu"])
    assert cfg.model.norm == "none" and cfg.model.positions == "none"


def test_a_model_config_saved_before_norm_bias_builds_the_model_it_trained():
    """Runs saved before model.norm_bias existed tied the norm shift to model.bias; their saved
    config has no norm_bias key, and must still build the checkpoint's shapes (export, finetune,
    resume of every older crammed-style run)."""
    saved = get_preset("crammed-bert")
    del saved["norm_bias"]
    with torch.device("meta"):
        old = build_model(ModelConfig.from_dict({**saved, "layers": 1}))
        new = build_model(preset_config("crammed-bert", layers=1))
    assert not any(n.endswith("norm1.bias") for n, _ in old.named_parameters())
    assert any(n.endswith("norm1.bias") for n, _ in new.named_parameters())
