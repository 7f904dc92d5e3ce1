"""The contract every registered technique keeps, on tiny 12-step CPU runs.

It trains; its acting case changes the run; it resumes from a mid-run checkpoint to the same
weights as an uninterrupted run; it is bit-identical to no technique when its options disable
it; it refuses a misapplication (a valid config) with a ConfigError of its own. Each technique
supplies the overrides through ``contract_cases()``. A plugin's technique is tested too when
``CRAMKIT_PLUGINS`` names its module (``CRAMKIT_PLUGINS=plugins/mine.py pytest tests/techniques``).
"""

from __future__ import annotations

import math

import pytest
import torch
from technique_helpers import interrupted_copy, metrics, quiet, tiny_config, weights

from cramkit.errors import ConfigError
from cramkit.plugins import load_plugins
from cramkit.techniques import TECHNIQUES
from cramkit.train.run import pretrain, resume_config

load_plugins()
NAMES = sorted(TECHNIQUES)
STEPS = 12


def _cases(name):
    cases = TECHNIQUES[name].contract_cases()
    assert cases is not None, f"technique '{name}' declares no contract_cases()"
    return cases


def _data(request, arch):
    return request.getfixturevalue("tiny_mlm_data" if arch == "bert" else "tiny_clm_data")


def _config(request, tmp_path, name, overrides, run_name, arch, technique=True):
    enable = [f"techniques=[{name}]"] if technique else []
    return tiny_config(_data(request, arch), tmp_path, f"train.budget={STEPS}steps", *enable,
                       *overrides, name=run_name, arch=arch)


def _assert_same_weights(a_dir, b_dir):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_every_technique_is_registered():
    assert {"pld", "stacking", "vcycle", "seqwarmup"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_technique_trains(name, request, tmp_path):
    cases = _cases(name)
    cfg = _config(request, tmp_path, name, (*cases.acting, "train.eval_every=0.5"), "run", cases.arch)
    summary = pretrain(cfg, say=quiet)
    assert summary["steps"] == STEPS and summary["stop_reason"] == "budget"
    assert math.isfinite(summary["final_val_loss"])
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


@pytest.mark.parametrize("name", NAMES)
def test_acting_technique_changes_the_run(name, request, tmp_path):
    """The acting case must act: overrides that leave the technique idle (or an option misspelt
    into a no-op) would let every other test here pass on a run without it."""
    cases = _cases(name)
    shared = tuple(o for o in cases.acting if not o.startswith(f"technique.{name}."))
    pretrain(_config(request, tmp_path, name, shared, "base", cases.arch, technique=False), say=quiet)
    pretrain(_config(request, tmp_path, name, cases.acting, "acting", cases.arch), say=quiet)
    base, acting = weights(tmp_path / "base"), weights(tmp_path / "acting")
    assert base.keys() != acting.keys() or any(not torch.equal(base[k], acting[k]) for k in base), \
        f"technique '{name}' left the run as it was with contract_cases().acting"


@pytest.mark.parametrize("name", NAMES)
def test_technique_resumes_to_identical_weights(name, request, tmp_path):
    cases = _cases(name)
    overrides = (*cases.acting, "train.checkpoint_every=0.5", "train.batch_ramp=0.5")
    pretrain(_config(request, tmp_path, name, overrides, "full", cases.arch), say=quiet)
    full = tmp_path / "full"
    cut = interrupted_copy(full, tmp_path / "cut", STEPS // 2)
    pretrain(resume_config(cut, []), run_dir=cut, resume=True, say=quiet)
    _assert_same_weights(full, cut)
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(full)][STEPS // 2:]
    assert [r["tokens"] for r in metrics(cut)] == [r["tokens"] for r in metrics(full)][STEPS // 2:]


@pytest.mark.parametrize("name", NAMES)
def test_disabled_technique_is_bit_identical_to_none(name, request, tmp_path):
    cases = _cases(name)
    pretrain(_config(request, tmp_path, name, (), "base", cases.arch, technique=False), say=quiet)
    pretrain(_config(request, tmp_path, name, cases.disabled, "off", cases.arch), say=quiet)
    _assert_same_weights(tmp_path / "base", tmp_path / "off")
    base, off = metrics(tmp_path / "base"), metrics(tmp_path / "off")
    assert [(r["loss"], r["tokens"], r["lr"]) for r in base] == [(r["loss"], r["tokens"], r["lr"]) for r in off]


@pytest.mark.parametrize("name", NAMES)
def test_misapplied_technique_fails_loudly(name, request, tmp_path):
    cases = _cases(name)
    # A valid config (so a misspelt key, refused as unknown, cannot pass for a misapplication)
    # that the technique itself refuses once it meets the run.
    cfg = _config(request, tmp_path, name, cases.misapplied, "bad", cases.arch)
    with pytest.raises(ConfigError) as refused:
        pretrain(cfg, say=quiet)
    assert not (tmp_path / "bad").exists(), refused.value  # nothing half-made left behind
