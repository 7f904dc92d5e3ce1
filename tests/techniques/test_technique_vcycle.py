"""The V-cycle operators (coalesce, de-coalesce, interpolate) and its stage table."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from technique_helpers import interrupted_copy, metrics, quiet, tiny_config, weights

from cramkit.errors import ConfigError
from cramkit.models import build_model
from cramkit.models.flops import count_parameters
from cramkit.models.presets import preset_config
from cramkit.schedules import linear
from cramkit.techniques.vcycle import (
    PAIRINGS,
    Scheme,
    VCycle,
    VCycleOptions,
    coalesce,
    coarse_config,
    decoalesce,
    default_fractions,
    default_full_share,
    interpolate,
    stage_at,
    stage_levels,
)
from cramkit.train.run import pretrain, resume_config

# Learned positions: the sinusoidal table is a function of the width (see the module docstring).
MODELS = {
    "bert": dict(preset="tiny", positions="learned"),
    "bert-untied-gelu": dict(preset="tiny", positions="learned", tie_embeddings=False, ffn="gelu",
                             bias=True),
    "bert-2018-head": dict(preset="tiny", positions="learned", head_transform=True, final_norm=False,
                           bias=True, type_vocab_size=2),
    "gpt": dict(preset="tiny-gpt"),
    "gpt-rotary": dict(preset="tiny-gpt", positions="rotary"),
    "bert-gains": dict(preset="tiny", positions="learned", residual_scale="scalar"),
    # Four blocks: with two, adjacent and strided depth pairings are the same grouping.
    "gpt-4-layers": dict(preset="tiny-gpt", layers=4),
    # sqrt(hidden) on the token embedding changes with the width: the table carries the ratio.
    "bert-embedding-scale": dict(preset="tiny", positions="learned", embedding_scale="sqrt_hidden"),
    "gpt-untied-embedding-scale": dict(preset="tiny-gpt", tie_embeddings=False,
                                       embedding_scale="sqrt_hidden"),
}
SCHEMES = [Scheme(w, d, pairing) for w, d in ((2, 1), (2, 2), (1, 2)) for pairing in sorted(PAIRINGS)]


def _model(kind, seed=0):
    spec = dict(MODELS[kind])
    cfg = preset_config(spec.pop("preset"), **spec)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    # Exact for factors of 2; a sqrt(2) embedding-scale ratio divides and multiplies back.
    exact = a.config.embedding_scale == "none"
    for key in sa:
        if exact:
            assert torch.equal(sa[key], sb[key]), key
        else:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_coalesce_decoalesce_coalesce_is_exact(kind, scheme):
    model = _model(kind)
    small = coalesce(model, scheme)
    assert small.config.hidden == model.config.hidden // scheme.width
    assert small.config.layers == model.config.layers // scheme.depth
    assert small.config.heads == model.config.heads // scheme.width
    large = decoalesce(small, scheme)
    assert large.config == model.config
    _same(coalesce(large, scheme), small)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("pairing", sorted(PAIRINGS))
def test_decoalesced_width_model_computes_the_small_models_function(kind, pairing):
    scheme = Scheme(2, 1, pairing)
    small = coalesce(_model(kind), scheme)
    # Train-like perturbation so the check does not rely on the initialisation's symmetry.
    with torch.no_grad():
        for p in small.parameters():
            p.add_(0.01 * torch.randn_like(p))
    large = decoalesce(small, scheme).eval()
    ids = torch.randint(0, small.config.vocab_size, (2, 24))
    torch.testing.assert_close(large(ids).logits, small(ids).logits, rtol=1e-4, atol=1e-4)
    h_small, h_large = small.encode(ids), large.encode(ids)
    if small.config.final_norm and not small.config.tie_embeddings:
        # Hidden channels are exact copies: channel c of the large model is channel c // 2
        # (adjacent) or c mod hidden/2 (strided).
        copies = h_small[..., PAIRINGS.get(pairing)(large.config.hidden, 2)]
        torch.testing.assert_close(h_large, copies, rtol=1e-4, atol=1e-5)


def test_coalescing_averages_pairs():
    model = _model("bert")
    small = coalesce(model, Scheme(2, 2))
    big = model.state_dict()
    # Depth then width: small block 0 = mean of blocks 0 and 1; channel pairs averaged.
    norm = (big["layers.0.norm1.weight"] + big["layers.1.norm1.weight"]) / 2
    torch.testing.assert_close(small.state_dict()["layers.0.norm1.weight"], norm.view(-1, 2).mean(1))
    # Input side sums: the first small qkv column gathers large columns 0 and 1.
    w = (big["layers.0.attn.qkv.weight"] + big["layers.1.attn.qkv.weight"]) / 2
    got = small.state_dict()["layers.0.attn.qkv.weight"]
    head_dim = model.config.head_dim
    rows = torch.cat([w[:head_dim], w[head_dim:2 * head_dim]]).view(2, head_dim, -1).mean(0)
    torch.testing.assert_close(got[:head_dim, 0], rows[:, 0] + rows[:, 1])


def test_strided_pairing_merges_unit_j_with_unit_j_plus_half():
    model = _model("gpt-4-layers")
    big = model.state_dict()
    half_layers, half_hidden = model.config.layers // 2, model.config.hidden // 2
    deep = coalesce(model, Scheme(1, 2, "strided")).state_dict()
    # Small block 0 = mean(large 0, large L/2), not mean(large 0, large 1).
    for rest in ("norm1.weight", "attn.qkv.weight", "ffn.down.weight"):
        torch.testing.assert_close(deep[f"layers.0.{rest}"],
                                   (big[f"layers.0.{rest}"] + big[f"layers.{half_layers}.{rest}"]) / 2)
    # Width: channel c merges with c + hidden/2; head j with head j + heads/2.
    wide = coalesce(model, Scheme(2, 1, "strided")).state_dict()
    norm = big["layers.0.norm1.weight"]
    torch.testing.assert_close(wide["layers.0.norm1.weight"], (norm[:half_hidden] + norm[half_hidden:]) / 2)
    out = big["layers.0.attn.out.weight"]  # input side: columns of merged heads are summed
    torch.testing.assert_close(wide["layers.0.attn.out.weight"],
                               (out[:half_hidden, :half_hidden] + out[half_hidden:, :half_hidden]) / 2
                               + (out[:half_hidden, half_hidden:] + out[half_hidden:, half_hidden:]) / 2)
    # De-coalescing stacks the small blocks 0 .. L/2-1 twice.
    small = coalesce(model, Scheme(1, 2, "strided"))
    large = decoalesce(small, Scheme(1, 2, "strided")).state_dict()
    for i in range(model.config.layers):
        assert torch.equal(large[f"layers.{i}.attn.qkv.weight"],
                           small.state_dict()[f"layers.{i % half_layers}.attn.qkv.weight"])


def test_unknown_pairing_and_schedule_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'strided'"):
        VCycleOptions.from_dict({"pairing": "stride"})
    with pytest.raises(ConfigError, match="did you mean 'per_stage'"):
        VCycleOptions.from_dict({"schedule": "per-stage"})
    with pytest.raises(ConfigError, match="unknown pairing"):
        Scheme(2, 1, "random")


def test_branch_gains_average_over_merged_blocks():
    model = _model("bert-gains")
    with torch.no_grad():
        model.layers[0].gain1.weight.fill_(0.5)
        model.layers[1].gain1.weight.fill_(1.5)
    small = coalesce(model, Scheme(2, 2))
    assert small.state_dict()["layers.0.gain1.weight"].item() == 1.0
    large = decoalesce(small, Scheme(2, 2))
    assert [b.gain1.weight.item() for b in large.layers] == [1.0, 1.0]


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_interpolation_endpoints(kind):
    a, b = _model(kind, seed=0), _model(kind, seed=1)
    _same(interpolate(a, b, 0.0), a)
    _same(interpolate(a, b, 1.0), b)
    mid = interpolate(a, b, 0.25).state_dict()
    key = "layers.0.ffn.up.weight"
    torch.testing.assert_close(mid[key], 0.75 * a.state_dict()[key] + 0.25 * b.state_dict()[key])
    # Pure: the inputs are unchanged, and the result shares no storage with them.
    assert not torch.equal(a.state_dict()[key], mid[key])


def test_interpolation_checks_its_inputs():
    a = _model("bert")
    with pytest.raises(ConfigError, match="alpha"):
        interpolate(a, a, 1.5)
    with pytest.raises(ConfigError, match="different architectures"):
        interpolate(a, coalesce(a, Scheme(2, 1)), 0.5)


def test_impossible_scheme_is_a_config_error():
    with pytest.raises(ConfigError, match="not divisible by 3"):
        coalesce(_model("bert"), Scheme(3, 1))
    with pytest.raises(ConfigError, match="layers=2 is not divisible by 4"):
        coalesce(_model("bert"), Scheme(1, 4))


def test_width_coalescing_of_tied_embeddings_without_norm_parameters_is_refused():
    # norm=none leaves the decoder's scale nowhere to go: the logits would change by the factor.
    cfg = preset_config("tiny", positions="learned", norm="none", embedding_norm=False, init="t-fixup",
                        embedding_scale="sqrt_hidden", ffn="gelu")
    with pytest.raises(ConfigError, match="tied embeddings"):
        VCycle(VCycleOptions.from_dict({"depth": 1})).configure_model(cfg)
    # Untied, or depth only, there is no scale to carry.
    VCycle(VCycleOptions.from_dict({"depth": 1})).configure_model(cfg.replace(tie_embeddings=False))
    VCycle(VCycleOptions.from_dict({"width": 1})).configure_model(cfg)


def test_stage_table():
    assert stage_levels(1) == [0]
    assert stage_levels(3) == [0, 1, 2, 1, 0]
    fractions = default_fractions(3)
    assert len(fractions) == 5 and abs(sum(fractions) - 1) < 1e-12
    table = [0.1, 0.3, 0.6]
    assert [stage_at(p, table) for p in (0.0, 0.099, 0.1, 0.39, 0.4, 1.0)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError, match="3 stage fractions"):
        VCycleOptions.from_dict({"fractions": [0.5, 0.5]})
    # From 7 levels on the default table has no budget left for the full model.
    assert all(f > 0 for f in VCycleOptions.from_dict({"levels": 6}).stage_fractions())
    with pytest.raises(ConfigError, match="no budget for the full model"):
        VCycleOptions.from_dict({"levels": 7})
    VCycleOptions.from_dict({"levels": 7, "fractions": [1 / 13] * 13})
    # A mistyped huge count is the same error, not a MemoryError building the default table.
    with pytest.raises(ConfigError, match="levels=1000000000000 leaves no budget for the full model"):
        VCycleOptions.from_dict({"levels": 10**12})
    assert [default_full_share(n) > 0 for n in range(1, 9)] == [default_fractions(n)[-1] > 0 for n in range(1, 9)]


def test_a_scheme_that_coalesces_nothing_is_refused():
    with pytest.raises(ConfigError, match="coalesce nothing"):
        VCycleOptions.from_dict({"width": 1, "depth": 1})
    VCycleOptions.from_dict({"width": 1, "depth": 1, "levels": 1})  # off: nothing to coalesce


def test_resuming_with_levels_that_lack_the_saved_stage_is_a_config_error(request, tmp_path):
    run = (*VCYCLE_RUN, "train.checkpoint_every=0.5")
    pretrain(tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *run, name="run"), say=quiet)
    one = ["technique.vcycle.levels=1", "technique.vcycle.fractions=[]"]
    three = ["technique.vcycle.levels=3", "technique.vcycle.fractions=[0.2,0.2,0.2,0.2,0.2]"]
    # Back on the full model (stage 3 of 3): one level has no stage 3, three put it on level 2.
    # Inside the coarse level (stage 2): three levels also have it on level 1, so that resumes.
    for step, stage, levels in ((12, 3, one), (12, 3, three), (6, 2, one)):
        cut = interrupted_copy(tmp_path / "run", tmp_path / f"cut{step}-{levels[0][-1]}", step)
        with pytest.raises(ConfigError, match=rf"^{levels[0]} differs from the V-cycle this run was checkpointed with: the "
                           rf"checkpoint is in stage {stage} of its V-cycle.*; resume with the levels"):
            pretrain(resume_config(cut, ["train.budget=24steps", *levels]), run_dir=cut, resume=True, say=quiet)


def test_resuming_a_coarse_level_with_another_pairing_is_a_config_error(request, tmp_path):
    """The pairing changes no shape, so the checkpoint loaded and the way up de-coalesced with
    the new pairing: it interpolated the saved weights with units that had never been merged."""
    pretrain(tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *VCYCLE_RUN,
                         "train.checkpoint_every=0.5", name="run"), say=quiet)
    strided = ["train.budget=24steps", "technique.vcycle.pairing=strided"]
    coarse = interrupted_copy(tmp_path / "run", tmp_path / "coarse", 6)  # stage 2: saved weights
    with pytest.raises(ConfigError, match=r"^technique.vcycle.pairing=strided differs from the adjacent this run was "
                                          r"checkpointed with: .*; resume with the scheme it was saved with"):
        pretrain(resume_config(coarse, strided), run_dir=coarse, resume=True, say=quiet)
    # Back on the full model nothing was coalesced with it any more: the change is harmless.
    full = interrupted_copy(tmp_path / "run", tmp_path / "full", 12)
    pretrain(resume_config(full, strided), run_dir=full, resume=True, say=quiet)


@pytest.mark.parametrize("fractions", ["[0.25,0.7,0.05]", "[0.25,0.5,0.25]"])
def test_a_run_that_ends_before_its_last_level_change_says_so(fractions, request, tmp_path):
    # 12 steps start at k / 12: none at or past 0.95, so the way back up never comes.
    cfg = tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *VCYCLE_RUN,
                      f"technique.vcycle.fractions={fractions}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(cfg, say=quiet)
    said = [str(w.message) for w in caught if "budget ran out with the model" in str(w.message)]
    if fractions == "[0.25,0.5,0.25]":
        assert not said
        return
    assert len(said) == 1 and "hidden=32" in said[0] and "model.hidden=64" in said[0], said
    assert summary["parameters"] < count_parameters(build_model(cfg.model))


def test_vcycle_levels_and_learning_rate_through_the_hooks():
    """Drive the hooks by hand: down at 10 %, up at 40 %, lr x2 on the coarse level."""

    class State:
        last_step = False

        def __init__(self, model):
            self.model, self.progress, self.lr_scale, self.pending_model = model, 0.0, 1.0, None
            self.lr_progress = 0.0

        def request_model(self, model, transfer=None):
            self.pending_model = (model, transfer)

    # alpha 0.25, not the symmetric 0.5: which model gets which weight must show.
    tech = VCycle(VCycleOptions.from_dict({"fractions": [0.1, 0.3, 0.6], "depth": 1, "alpha": 0.25}))
    model = _model("bert")
    cfg = tech.configure_model(model.config)
    assert cfg == model.config
    state = State(model)
    state.progress = 0.1
    state.last_step = True  # the step spends the budget: no level change nothing would train
    tech.on_step_end(state)
    assert state.pending_model is None and tech.stage == 0 and not tech.saved
    state.last_step = False
    tech.on_step_end(state)
    small = state.pending_model[0]
    assert small.config.hidden == 32 and tech.level == 1 and len(tech.saved) == 1
    state.model, state.pending_model, state.lr_scale = small, None, 1.0
    tech.on_step_start(state)
    assert state.lr_scale == 2.0
    # Resume inside the coarse level: the state says which model to build.
    again = VCycle(tech.options)
    again.load_state_dict(tech.state_dict())
    assert again.configure_model(model.config) == small.config
    state.progress = 0.45
    tech.on_step_end(state)
    back = state.pending_model[0]
    assert back.config == model.config and tech.level == 0 and not tech.saved
    expected = interpolate(model, decoalesce(small, tech.scheme), 0.25)
    _same(back, expected)
    # A larger budget on resume lowers the progress: the cycle does not go back, and the model
    # (with its optimizer) is not swapped for itself.
    state.model, state.pending_model, state.progress = back, None, 0.05
    tech.on_step_end(state)
    assert state.pending_model is None and tech.stage == 2


def test_levels_change_on_the_evaluated_weights_of_schedule_free():
    """Schedule-Free trains at y and is evaluated at its average x; the next level's optimizer
    starts afresh, so the level is left with x (coalescing y threw the averaging away)."""
    pytest.importorskip("pytorch_optimizer")
    from pytorch_optimizer import ScheduleFreeAdamW

    class State:
        last_step = False

        def __init__(self, model, optimizer):
            self.model, self.optimizer, self.progress, self.pending_model = model, optimizer, 0.1, None

        def request_model(self, model, transfer=None):
            self.pending_model = (model, transfer)

    model = _model("bert").train()
    optimizer = ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    optimizer.train()
    ids = torch.randint(5, model.config.vocab_size, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.eval()
    evaluated = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer.train()
    model.load_state_dict(trained)
    assert any(not torch.equal(trained[k], evaluated[k]) for k in trained)

    tech = VCycle(VCycleOptions.from_dict({"fractions": [0.1, 0.3, 0.6], "depth": 1}))
    tech.configure_model(model.config)
    state = State(model, optimizer)
    tech.on_step_end(state)
    reference = _model("bert")
    reference.load_state_dict(evaluated)
    _same(state.pending_model[0], coalesce(reference, tech.scheme))
    assert all(torch.equal(tech.saved[0][k], evaluated[k]) for k in evaluated)
    # The old model and optimizer are left as they were: training weights y.
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)


# 12 steps, stages [0.25, 0.5, 0.25]: a step starts at progress (k - 1) / 12 and a stage change
# takes effect after the first step that starts at or past its edge, so steps 1-4 run the full
# model, 5-10 the small one (lr x2), 11-12 the full one again.
VCYCLE_RUN = ("techniques=[vcycle]", "technique.vcycle.fractions=[0.25,0.5,0.25]", "model.positions=learned",
              "train.budget=12steps", "schedule.name=linear", "schedule.warmup=0", "schedule.final=0.1")
STAGE_OF_STEP = [0] * 4 + [1] * 6 + [2] * 2
STAGE_WINDOWS = [(0.0, 0.25), (0.25, 0.5), (0.75, 0.25)]  # (start, length)
LEVEL_SCALE = [1.0, 2.0, 1.0]


def _lr_relative_to_first_step(request, tmp_path, *overrides):
    cfg = tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *VCYCLE_RUN, *overrides)
    pretrain(cfg, say=quiet)
    lrs = [r["lr"] for r in metrics(tmp_path / "run")]
    assert len(lrs) == 12
    return [lr / lrs[0] for lr in lrs]


def test_global_schedule_runs_once_over_the_budget(request, tmp_path):
    """The default, as before: one linear decay over the whole budget, times 2 on the small level."""
    got = _lr_relative_to_first_step(request, tmp_path)
    expected = [LEVEL_SCALE[s] * linear((k - 1) / 12, final=0.1) for k, s in enumerate(STAGE_OF_STEP, 1)]
    assert all(math.isclose(g, e, rel_tol=1e-9) for g, e in zip(got, expected, strict=True)), got


def test_the_level_learning_rate_is_the_one_the_optimizer_steps_with(request, tmp_path, monkeypatch):
    """The logged lr and the optimizer's are computed apart: a trainer that logged the level's
    lr_scale but stepped without it passed the tests above, which read the log alone."""
    from cramkit.train.trainer import Trainer

    used, step = [], Trainer.train_step

    def recording_step(self, batches):
        used.append({g["lr"] for g in self.state.optimizer.param_groups})
        return step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", recording_step)
    _lr_relative_to_first_step(request, tmp_path)
    logged = [r["lr"] for r in metrics(tmp_path / "run")]
    assert all(len(rates) == 1 for rates in used)
    stepped = [rates.pop() for rates in used]
    assert stepped == pytest.approx(logged, rel=1e-12)
    # Steps 5-10 run the small level: twice the schedule's rate at the same progress.
    assert stepped[4] / stepped[0] == pytest.approx(2 * linear(4 / 12, final=0.1))


def test_per_stage_schedule_restarts_in_every_stage(request, tmp_path):
    got = _lr_relative_to_first_step(request, tmp_path, "technique.vcycle.schedule=per_stage")
    expected = []
    for k, s in enumerate(STAGE_OF_STEP, 1):
        start, length = STAGE_WINDOWS[s]
        local = min(1.0, ((k - 1) / 12 - start) / length)
        expected.append(LEVEL_SCALE[s] * linear(local, final=0.1))
    assert all(math.isclose(g, e, rel_tol=1e-9) for g, e in zip(got, expected, strict=True)), got
    # The small model's last step runs at the schedule's end value (x2), fully annealed; the
    # full model then starts again near its peak.
    assert math.isclose(got[9], 2 * 0.1) and got[10] > 0.5


@pytest.mark.parametrize("optimizer", ["adamw", "schedulefree"])  # the latter changes level on x
def test_per_stage_schedule_resumes_to_identical_weights(request, tmp_path, optimizer):
    if optimizer == "schedulefree":
        pytest.importorskip("pytorch_optimizer")
    run = (*VCYCLE_RUN, "technique.vcycle.schedule=per_stage", "train.checkpoint_every=0.5",
           f"optim.name={optimizer}")
    pretrain(tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *run, name="full"), say=quiet)
    full = tmp_path / "full"
    cut = interrupted_copy(full, tmp_path / "cut", 6)  # inside the small level's stage
    pretrain(resume_config(cut, []), run_dir=cut, resume=True, say=quiet)
    a, b = weights(full), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["lr"] for r in metrics(cut)] == [r["lr"] for r in metrics(full)][6:]


def test_a_level_change_due_at_the_last_step_is_not_made_and_a_longer_resume_makes_it(request, tmp_path):
    """Step 8 of 8 starts at 7/8, the last stage's edge: de-coalescing and interpolating after it
    ended the run on a full model that never trained a step. The run ends on the level it trained
    (and says so), with the state to go back up on a resume with a larger budget."""
    from cramkit.train import checkpoint as ckpt

    run = tmp_path / "run"
    cfg = tiny_config(request.getfixturevalue("tiny_mlm_data"), tmp_path, *VCYCLE_RUN, "train.budget=8steps",
                      "technique.vcycle.fractions=[0.25,0.625,0.125]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pretrain(cfg, say=quiet)
    assert weights(run)["embeddings.tokens.weight"].shape[1] == 32
    saved = ckpt.load_state(ckpt.latest_checkpoint(run))["techniques"]["vcycle"]
    assert saved["stage"] == 1 and len(saved["saved"]) == 1
    assert summary["parameters"] == count_parameters(build_model(coarse_config(cfg.model, Scheme(2, 2))))
    assert any("budget ran out with the model at hidden=32" in str(w.message) for w in caught)

    # Step 9 of 16 starts at 1/2, inside the coarse stage; step 15, at 7/8, goes back up.
    longer = pretrain(resume_config(run, ["train.budget=16steps"]), run_dir=run, resume=True, say=quiet)
    assert weights(run)["embeddings.tokens.weight"].shape[1] == 64
    saved = ckpt.load_state(ckpt.latest_checkpoint(run))["techniques"]["vcycle"]
    assert saved["stage"] == 2 and not saved["saved"]
    assert longer["parameters"] == count_parameters(build_model(cfg.model))
