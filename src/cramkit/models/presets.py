"""Named model shapes. Each preset is a complete dict of ModelConfig fields.

| preset | what |
| --- | --- |
| ``tiny`` | crammed-style BERT, hidden 64, 2 layers (CPU tests, demos) |
| ``tiny-gpt`` | GPT-2-style decoder, hidden 64, 2 layers |
| ``crammed-bert`` | Geiping & Goldstein 2023, as in docs/references.md and cramming's code |
| ``bert-base`` | Devlin et al. 2018 BERT-base (post-LN, dropout 0.1, full-vocabulary head) |
| ``gpt2-small`` | GPT-2 124M (pre-LN, learned positions, tied) |

``bert-base`` uses a vocabulary of 32768 rather than the original 30522 so that it trains on the
same prepared data as ``crammed-bert`` (override ``vocab_size`` for the original WordPiece).
``gpt2-small`` pads GPT-2's 50257 tokens to 50304 (a multiple of 64, for fast matmuls) and uses no
dropout by default (GPT-2 used 0.1; under a short budget dropout only slows learning).

``crammed-bert`` has no bias on any linear layer, but its LayerNorms keep their shift: cramming
builds them as plain ``torch.nn.LayerNorm`` (``architectures/crammed_bert.py``), and its
``use_bias: False`` reaches only the linear layers (docs/references.md's "no biases anywhere" lists
attention, FFN and decoder).

``bert-base`` and ``gpt2-small`` keep exactly the parameters of HF ``BertForMaskedLM`` and
``GPT2LMHeadModel`` (same norms, biases, eps and GELU flavour), so they export one-to-one.
"""

from __future__ import annotations

import copy
from typing import Any

from ..configbase import did_you_mean
from ..errors import ConfigError
from .config import ModelConfig

_CRAMMED: dict[str, Any] = {
    "arch": "bert",
    "vocab_size": 32768,
    "hidden": 768,
    "layers": 16,
    "heads": 12,
    "intermediate": 3072,
    "norm_position": "pre",
    "norm": "layernorm",
    "norm_eps": 1e-12,
    "bias": False,
    "norm_bias": True,
    "ffn": "glu",
    "activation": "gelu",
    "positions": "sinusoidal",
    "max_positions": 512,
    "rotary_base": 10000.0,
    "embedding_scale": "none",
    "type_vocab_size": 0,
    "embedding_norm": True,
    "final_norm": True,
    "tie_embeddings": True,
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "head_transform": False,
    "decoder_bias": False,
    "sparse_prediction": True,
    "residual_scale": "none",
    "init": "normal",
    "init_std": 0.02,
    "document_mask": False,
    "document_boundary_id": None,
    "document_mask_kernel": "auto",
}

_BERT_BASE: dict[str, Any] = {
    **_CRAMMED,
    "layers": 12,
    "norm_position": "post",
    "bias": True,
    "norm_bias": True,
    "ffn": "gelu",
    "positions": "learned",
    "max_positions": 512,
    "type_vocab_size": 2,
    "final_norm": False,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "head_transform": True,
    "decoder_bias": True,
    "sparse_prediction": False,
}

_GPT2_SMALL: dict[str, Any] = {
    **_CRAMMED,
    "arch": "gpt",
    "vocab_size": 50304,
    "layers": 12,
    "norm_eps": 1e-5,
    "bias": True,
    "norm_bias": True,
    "ffn": "gelu",
    "activation": "gelu_tanh",
    "positions": "learned",
    "max_positions": 1024,
    "embedding_norm": False,
    "sparse_prediction": False,
    "init": "gpt2",
}

_TINY_SHAPE = {"vocab_size": 1024, "hidden": 64, "layers": 2, "heads": 4, "intermediate": 256}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {**_CRAMMED, **_TINY_SHAPE, "max_positions": 512},
    "tiny-gpt": {**_GPT2_SMALL, **_TINY_SHAPE, "max_positions": 256},
    "crammed-bert": _CRAMMED,
    "bert-base": _BERT_BASE,
    "gpt2-small": _GPT2_SMALL,
}


def get_preset(name: str) -> dict[str, Any]:
    """A fresh copy of the preset's ModelConfig fields; ConfigError for an unknown name."""
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ConfigError(
            f"unknown model preset '{name}'{did_you_mean(name, PRESETS)}; "
            f"choose from {sorted(PRESETS)}"
        ) from None


def preset_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset as a validated ModelConfig, with some fields overridden."""
    data = get_preset(name)
    data.update(overrides)
    return ModelConfig.from_dict(data, path="model")
