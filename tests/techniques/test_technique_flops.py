"""Each technique's FLOP accounting against an independent count of the FLOPs the step ran.

MFU and FLOP budgets are only as honest as ``flops_per_token`` while a technique drops blocks,
grows depth, changes width or shortens sequences. Here PyTorch's ``FlopCounterMode`` counts the
matrix products of every forward and backward pass of a tiny run, and each step's count must
match what the trainer charged that step (``flops`` in ``metrics.jsonl``).

The count (``technique_helpers.counting_train_step``) takes out one known difference, not hidden
in a tolerance: accounting charges the LM head for the expected share of targets (the masking
rate), where a step's random masks hold a few more or fewer. It counts CPU attention as the
model-FLOP convention of flops.py does.

What stays is the accounting's ``6 * parameters`` for norm weights, which run no matrix product
(about 0.3 % of these tiny models), well inside the 1 % tolerance. The runs turn biases off
(linear biases for the GPT, norm shifts for both) for the same reason: a bias is a parameter
without a matrix product, 1.3 % of the tiny GPT and more in a width-coalesced V-cycle level.
"""

from __future__ import annotations

import pytest
from technique_helpers import charged_flops, counting_train_step, metrics, quiet, tiny_config

from cramkit.plugins import load_plugins
from cramkit.techniques import TECHNIQUES
from cramkit.train.run import pretrain
from cramkit.train.trainer import Trainer

load_plugins()  # a plugin's technique is counted too when CRAMKIT_PLUGINS names it


@pytest.mark.parametrize("name", [None, *sorted(TECHNIQUES)])
@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_flops_charged_per_step_match_the_flops_the_step_ran(name, arch, request, tmp_path, monkeypatch):
    counted: list[float] = []
    monkeypatch.setattr(Trainer, "train_step", counting_train_step(counted))
    cases = TECHNIQUES[name].contract_cases() if name else None
    technique = (f"techniques=[{name}]", *cases.acting) if cases else ()
    data = request.getfixturevalue("tiny_mlm_data" if arch == "bert" else "tiny_clm_data")
    bias = ("model.norm_bias=false", *(("model.bias=false",) if arch == "gpt" else ()))
    pretrain(tiny_config(data, tmp_path, "train.budget=12steps", *bias, *technique, arch=arch), say=quiet)
    records = metrics(tmp_path / "run")
    charged = charged_flops(tmp_path / "run")
    tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *records], records)]
    assert len(counted) == len(charged) == 12
    assert charged == pytest.approx(counted, rel=0.01)
    per_token = {round(c / t) for c, t in zip(charged, tokens)}
    if cases is not None and cases.changes_flops:  # it did change the cost, so the check has teeth
        assert len(per_token) > 1
    elif cases is not None:  # as it declares: charged at the full model's constant cost
        assert len(per_token) == 1


@pytest.mark.parametrize("name", [None, "pld"])
def test_head_transform_under_sparse_prediction_is_charged_on_the_targets_only(name, tiny_mlm_data, tmp_path,
                                                                               monkeypatch):
    """Sparse prediction runs BERT 2018's head transform, like the decoder, on the masked
    positions only; charged at every token it overstated the tiny model's steps by 2 %, and by
    7 % once layer dropping had left little else."""
    counted: list[float] = []
    monkeypatch.setattr(Trainer, "train_step", counting_train_step(counted))
    technique = (f"techniques=[{name}]", *TECHNIQUES[name].contract_cases().acting) if name else ()
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=12steps", "model.norm_bias=false",
                         "model.head_transform=true", *technique), say=quiet)
    charged = charged_flops(tmp_path / "run")
    assert charged == pytest.approx(counted, rel=0.01)
