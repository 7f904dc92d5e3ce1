"""Progressive layer dropping: schedule, statistics of the decisions, real skipping, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
from technique_helpers import metrics, quiet, tiny_config, weights

from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.models.layers import Block
from cramkit.models.presets import preset_config
from cramkit.techniques.pld import (
    PLDOptions,
    ProgressiveLayerDropping,
    block_flops_per_token,
    expected_layers,
    keep_probabilities,
    sample_keep,
    theta,
)
from cramkit.train.run import pretrain


class _State:
    def __init__(self, model, progress=0.0, step=0):
        self.model, self.progress, self.usage_step = model, progress, step

    @property
    def step(self):
        return self.usage_step


def test_schedule_shape():
    assert theta(0.0, 0.5, 100) == 1.0
    assert theta(1.0, 0.5, 100) == pytest.approx(0.5)
    probs = keep_probabilities(0.5, 4, 0.5, 2.0)
    top = theta(0.5, 0.5, 2.0)
    assert probs[-1] == pytest.approx(top)
    assert probs == sorted(probs, reverse=True)
    steps = [b - a for a, b in zip(probs, probs[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps)  # linear in depth
    assert keep_probabilities(0.3, 6, 1.0, 10.0) == [1.0] * 6


@pytest.mark.parametrize("progress", [0.05, 0.5, 1.0])
def test_executed_layers_match_the_schedule(progress):
    layers, theta_bar, gamma, n = 8, 0.5, 5.0, 4000
    probs = keep_probabilities(progress, layers, theta_bar, gamma)
    counts = [sum(sample_keep(probs, seed=3, step=s)) for s in range(n)]
    mean = sum(counts) / n
    expected = expected_layers(progress, layers, theta_bar, gamma)
    variance = sum(p * (1 - p) for p in probs)  # independent Bernoulli draws per block
    assert abs(mean - expected) < 4 * math.sqrt(variance / n) + 1e-12
    # Per block, too: the top block is kept at theta(t).
    top = sum(sample_keep(probs, seed=3, step=s)[-1] for s in range(n)) / n
    assert abs(top - probs[-1]) < 4 * math.sqrt(probs[-1] * (1 - probs[-1]) / n) + 1e-12


def test_decisions_depend_only_on_seed_and_step():
    probs = [0.5] * 6
    assert sample_keep(probs, 1, 7) == sample_keep(probs, 1, 7)
    assert len({tuple(sample_keep(probs, 1, s)) for s in range(20)}) > 5
    state = torch.get_rng_state()
    sample_keep(probs, 1, 7)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not touched


def test_dropped_blocks_do_no_compute_and_kept_branches_are_scaled():
    torch.manual_seed(0)
    model = build_model(preset_config("tiny", layers=6))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    tech = ProgressiveLayerDropping(PLDOptions.from_dict({"theta_bar": 0.2, "gamma": 50, "seed": 1}))
    model = tech.on_model(model)
    assert model.state_dict().keys() == reference.keys()  # surgery keeps names (checkpoints, export)
    calls = [0] * 6
    for i, block in enumerate(model.layers):
        block.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(5, 1000, (2, 16))
    model.train()
    for step in range(10):
        before = list(calls)
        tech.on_step_start(_State(model, progress=0.9, step=step))
        model(ids, labels=ids)
        ran = [c - b for c, b in zip(calls, before)]
        assert ran == [int(k) for k in tech.keep]
    assert sum(calls) < 60 and calls[0] > calls[-1]
    # Evaluation runs every block, unscaled: the same function as the untouched model.
    model.eval()
    before = list(calls)
    plain = build_model(preset_config("tiny", layers=6))
    plain.load_state_dict(reference)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)
    assert calls == [c + 1 for c in before]


def test_each_step_sets_every_blocks_scale_to_one_over_its_keep_probability():
    model = build_model(preset_config("tiny", layers=6))
    tech = ProgressiveLayerDropping(PLDOptions.from_dict({"theta_bar": 0.3, "gamma": 5}))
    model = tech.on_model(model)
    for progress in (0.0, 0.4, 0.9):
        tech.on_step_start(_State(model, progress=progress, step=3))
        want = [1.0 / p for p in keep_probabilities(progress, 6, 0.3, 5.0)]
        # By index: iterating the blocks in training mode yields only the kept ones.
        assert [float(model.layers[i].pld_scale) for i in range(6)] == pytest.approx(want, rel=1e-6)
    assert float(model.layers[5].pld_scale) > float(model.layers[0].pld_scale) > 1.0  # deep: scaled most


def test_kept_block_scales_its_branches_by_one_over_p():
    torch.manual_seed(0)
    model = ProgressiveLayerDropping(PLDOptions()).on_model(build_model(preset_config("tiny")))
    block = model.layers[0]
    x = torch.randn(1, 8, 64)
    block.train()
    block.pld_scale.fill_(1.0)
    plain = block(x)
    attn = block.attn(block.norm1(x))
    block.pld_scale.fill_(2.0)
    scaled = block(x)
    mid = x + 2.0 * attn
    expected = mid + 2.0 * block.ffn(block.norm2(mid))
    torch.testing.assert_close(scaled, expected)
    assert not torch.allclose(plain, scaled)


def test_branch_gains_are_kept():
    """With model.residual_scale=scalar the switchable block still applies the branch gains: in
    evaluation it is the plain model's function, in training the gains learn."""
    torch.manual_seed(0)
    cfg = preset_config("tiny", layers=3, residual_scale="scalar", init="skipinit")
    plain = build_model(cfg)
    with torch.no_grad():  # non-trivial gains (skipinit starts them at 0)
        for i, block in enumerate(plain.layers):
            block.gain1.weight.fill_(0.5 + i)
            block.gain2.weight.fill_(-0.25 * (i + 1))
    model = build_model(cfg)
    model.load_state_dict(plain.state_dict())
    tech = ProgressiveLayerDropping(PLDOptions.from_dict({"theta_bar": 1.0}))
    model = tech.on_model(model)
    ids = torch.randint(5, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)
    model.train()
    tech.on_step_start(_State(model, progress=0.5, step=0))  # theta_bar=1: every block kept, 1/p = 1
    model(ids, labels=ids).loss.backward()
    for block in model.layers:
        assert block.gain1.weight.grad is not None and block.gain2.weight.grad is not None


def test_post_ln_model_is_refused():
    model = build_model(preset_config("tiny", norm_position="post", final_norm=False))
    with pytest.raises(ConfigError, match="pre-LN"):
        ProgressiveLayerDropping(PLDOptions()).on_model(model)
    with pytest.raises(ConfigError, match="theta_bar"):
        PLDOptions.from_dict({"theta_bar": 0.0})


@pytest.mark.parametrize("options", [{"theta_bar": 1.0}, {"theta_bar": 0.5, "gamma": 0.0}])
def test_pld_that_keeps_every_block_leaves_the_model_as_it_is(options):
    """Switched off (theta stays 1) pld still made the blocks switchable: its skip loop, kept out
    of the compiled graph, split a compiled model, which then trained other weights (float
    rounding) than the same run without pld."""
    model = build_model(preset_config("tiny", layers=4))
    pld = ProgressiveLayerDropping(PLDOptions.from_dict(options))
    assert pld.on_model(model) is model
    assert type(model.layers) is torch.nn.ModuleList
    assert all(type(block) is Block for block in model.layers)
    pld.on_step_start(_State(model, progress=0.5, step=3))
    assert pld.flops_per_token(100.0, _State(model)) == 100.0
    assert not pld.unused_parameters  # DDP need not search for unused parameters
    assert ProgressiveLayerDropping(PLDOptions()).unused_parameters


@pytest.mark.compile
def test_compiled_run_with_pld_off_is_bit_identical_to_none(tiny_mlm_data, tmp_path):
    run = ("train.budget=3steps", "train.compile=true")
    pretrain(tiny_config(tiny_mlm_data, tmp_path, *run, name="base"), say=quiet)
    pretrain(tiny_config(tiny_mlm_data, tmp_path, *run, "techniques=[pld]", "technique.pld.theta_bar=1",
                         name="off"), say=quiet)
    base, off = weights(tmp_path / "base"), weights(tmp_path / "off")
    assert all(torch.equal(base[key], off[key]) for key in base)


def test_flops_count_executed_blocks(tiny_mlm_data, tmp_path):
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=20steps", "train.batch_ramp=0",
                      "model.layers=6", "techniques=[pld]", "technique.pld.theta_bar=0.2",
                      "technique.pld.gamma=20")
    summary = pretrain(cfg, say=quiet)
    from cramkit.models.flops import flops_per_token

    full = flops_per_token(cfg.model, 32, cfg.objective.mask_rate)
    per_block = block_flops_per_token(cfg.model, 32)
    opts = PLDOptions.from_dict(cfg.technique["pld"])
    tokens = metrics(tmp_path / "run")[0]["tokens"]
    expected = 0.0
    for step in range(20):
        probs = keep_probabilities(step / 20, 6, opts.theta_bar, opts.gamma)
        kept = sum(sample_keep(probs, opts.seed, step))
        expected += tokens * (full - (6 - kept) * per_block)
    assert summary["flops"] == pytest.approx(expected, rel=1e-12)
    assert summary["flops"] < 20 * tokens * full
    # The block share of the model: dropping all blocks would leave the embeddings and head.
    assert 6 * per_block < full


def _fake_block_compile(monkeypatch, calls, fail=False):
    """``Module.compile`` as pld's ``compile_blocks`` calls it, without the compiler: the block's
    compiled call records whether it ran with gradients (training) and can fail like a compiler."""

    def compile(self, *args, **kwargs):
        def compiled(*a, **k):
            calls.append(("block", torch.is_grad_enabled()))
            if fail:
                raise RuntimeError("no compiler here")
            return self._call_impl(*a, **k)

        self._compiled_call_impl = compiled

    monkeypatch.setattr(torch.nn.Module, "compile", compile)


def test_compiled_blocks_warm_up_before_the_first_step(tiny_mlm_data, tmp_path, monkeypatch):
    """Without train.compile, blocks compiled on their own compiled lazily in the first training
    steps: several seconds of compilation on the budget's clock (the warm-up is outside it)."""
    from cramkit.train.trainer import Trainer

    calls = []
    _fake_block_compile(monkeypatch, calls)
    real_step = Trainer.train_step

    def step(self, batches):
        calls.append(("step", None))
        return real_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", step)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "model.layers=2", "techniques=[pld]",
                      "technique.pld.compile_blocks=true", "train.compile=false")
    pretrain(cfg, say=quiet)
    first_step = calls.index(("step", None))
    assert ("block", True) in calls[:first_step]  # a training forward before any step


def test_compiled_blocks_that_fail_to_compile_train_eagerly(tiny_mlm_data, tmp_path, monkeypatch):
    calls = []
    _fake_block_compile(monkeypatch, calls, fail=True)
    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=2steps", "model.layers=2", "techniques=[pld]",
                      "technique.pld.compile_blocks=true", "train.compile=false")
    with pytest.warns(UserWarning, match="torch.compile failed.*eager"):
        summary = pretrain(cfg, say=quiet)
    assert summary["steps"] == 2
    assert len(calls) == 1  # the warm-up's first block call failed; none after it


@pytest.mark.parametrize("whole_model", [False, True])  # train.compile off (pld's blocks) / on
def test_a_backward_that_fails_to_compile_leaves_no_gradients(monkeypatch, whole_model):
    """The compiler lowers a backward at its first call: failing there, it has already written
    the gradients of the layers after the failing one, which the first step would add to its own."""
    from cramkit.train.run import _compiler

    class FailsBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward failed to compile")

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    block = model[0]
    block._compiled_call_impl = block._call_impl  # compiled on its own, as compile_blocks does
    block.register_forward_hook(lambda m, args, out: FailsBackward.apply(out))
    monkeypatch.setattr(torch, "compile", lambda m: m)

    def warm_up(m):
        m(torch.randn(2, 4)).sum().backward()
        m.zero_grad(set_to_none=True)

    with pytest.warns(UserWarning, match="torch.compile failed.*eager"):
        _compiler(whole_model, warm_up)(model)
    assert all(p.grad is None for p in model.parameters())
