"""Each technique's FLOP accounting against an independent count of the FLOPs the step ran.

MFU and FLOP budgets are only as honest as ``flops_per_token`` while a technique drops blocks,
grows depth, changes width or shortens sequences. Here PyTorch's ``FlopCounterMode`` counts the
matrix products of every forward and backward pass of a tiny run, and each step's count must
match what the trainer charged that step (``flops`` in ``metrics.jsonl``).

Two known differences are taken out of the count, not hidden in a tolerance:

* FLOP accounting charges the LM head for the expected share of targets (the masking rate);
  a step's random masks hold a few more or fewer, each ``6 * hidden * vocab`` (plus
  ``6 * hidden * hidden`` for a head transform).
* CPU attention is an op that ``FlopCounterMode`` does not count by default. It is counted as
  the model-FLOP convention that flops.py follows counts it: the two L x L products forward
  (``FlopCounterMode``'s own formula), twice that backward. ``FlopCounterMode``'s formula for
  the GPU kernels' backward adds the recomputed scores, which are hardware FLOPs, not model FLOPs.

What stays is the accounting's ``6 * parameters`` for norm weights, which run no matrix product
(about 0.3 % of these tiny models), well inside the 1 % tolerance. The runs turn biases off
(linear biases for the GPT, norm shifts for both) for the same reason: a bias is a parameter
without a matrix product, 1.3 % of the tiny GPT and more in a width-coalesced V-cycle level.
"""

from __future__ import annotations

import pytest
import torch
from technique_helpers import metrics, quiet, tiny_config
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from cramkit.objectives import IGNORE_INDEX
from cramkit.plugins import load_plugins
from cramkit.techniques import TECHNIQUES
from cramkit.train.run import pretrain
from cramkit.train.trainer import Trainer

load_plugins()  # a plugin's technique is counted too when CRAMKIT_PLUGINS names it
_aten = torch.ops.aten
CPU_ATTENTION = {
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, **kw: 2 * sdpa_flop_count(q, k, v),
}


def _counting(counted: list[float]):
    """Trainer._forward_backward, counting FLOPs; the count per step goes into ``counted``."""
    original = Trainer._forward_backward

    def forward_backward(self, batches, total_targets):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
            loss = original(self, batches, total_targets)
        flops = float(counter.get_total_flops())
        cfg = self.raw_model.config
        if cfg.sparse_prediction:  # the targets this step's masks drew, against the expected share
            targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            tokens = sum(b["input_ids"].numel() for b in batches)
            head = cfg.hidden * (cfg.vocab_size + (cfg.hidden if cfg.head_transform else 0))
            flops -= 6 * head * (targets - self.cfg.objective.mask_rate * tokens)
        counted.append(flops)
        return loss

    return forward_backward


@pytest.mark.parametrize("name", [None, *sorted(TECHNIQUES)])
@pytest.mark.parametrize("arch", ["bert", "gpt"])
def test_flops_charged_per_step_match_the_flops_the_step_ran(name, arch, request, tmp_path, monkeypatch):
    counted: list[float] = []
    monkeypatch.setattr(Trainer, "_forward_backward", _counting(counted))
    cases = TECHNIQUES[name].contract_cases() if name else None
    technique = (f"techniques=[{name}]", *cases.acting) if cases else ()
    data = request.getfixturevalue("tiny_mlm_data" if arch == "bert" else "tiny_clm_data")
    bias = ("model.norm_bias=false", *(("model.bias=false",) if arch == "gpt" else ()))
    pretrain(tiny_config(data, tmp_path, "train.budget=12steps", *bias, *technique, arch=arch), say=quiet)
    records = metrics(tmp_path / "run")
    charged = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}, *records], records)]
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
    monkeypatch.setattr(Trainer, "_forward_backward", _counting(counted))
    technique = (f"techniques=[{name}]", *TECHNIQUES[name].contract_cases().acting) if name else ()
    pretrain(tiny_config(tiny_mlm_data, tmp_path, "train.budget=12steps", "model.norm_bias=false",
                         "model.head_transform=true", *technique), say=quiet)
    records = metrics(tmp_path / "run")
    charged = [b["flops"] - a["flops"] for a, b in zip([{"flops": 0.0}, *records], records)]
    assert charged == pytest.approx(counted, rel=0.01)
