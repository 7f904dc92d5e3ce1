"""Config loading: recipes, overrides, strict keys with hints, budgets and schedules."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from cramkit.budget import Budget, Clock, Usage, exhausted, progress
from cramkit.config import load_config, recipe_names
from cramkit.errors import ConfigError
from cramkit.optim import build_optimizer
from cramkit.schedules import accumulation_steps, lr_factor, ramp_accumulation


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.recipe == name
    assert cfg.description
    Budget.parse(cfg.train.budget)
    cfg2 = type(cfg).from_dict(cfg.to_dict())  # the saved form round-trips
    assert cfg2 == cfg


def test_required_recipes_are_shipped():
    assert {"demo", "crammed-bert", "bert-original", "gpt-small"} <= set(recipe_names())


def test_crammed_recipe_matches_reference():
    cfg = load_config("crammed-bert")
    m = cfg.model
    assert (m.layers, m.hidden, m.heads, m.intermediate) == (16, 768, 12, 3072)
    assert m.norm_position == "pre" and not m.bias and m.ffn == "glu" and m.sparse_prediction
    assert cfg.objective.mask_rate == 0.25
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 1e-12
    # cramming's AdamW betas, as AdamW's own default (so that optim.name=lion gets Lion's).
    opt = build_optimizer(torch.nn.Linear(2, 2), cfg.optim, torch.device("cpu"))
    assert cfg.optim.betas is None and opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert cfg.train.clip_grad == 0.5 and cfg.train.batch_size == 8192 and cfg.train.batch_ramp == 0.6
    assert cfg.schedule.name == "budget-triangle"


def test_only_the_cramming_recipes_take_crammings_data_steps():
    """docs/references.md's data recipe: compressibility filter at 0.25 and the sentence-length
    curriculum; the 2018 recipe trained on shuffled, unfiltered data."""
    for name in ("crammed-bert", "crammed-bert-lamb"):
        prep = load_config(name).data.prepare
        assert (prep.max_token_ratio, prep.ordering) == (0.25, "curriculum"), name
        assert prep.ascii_only and prep.lowercase and prep.strip_accents
    prep = load_config("bert-original").data.prepare
    assert (prep.max_token_ratio, prep.ordering) == (0.0, "random")


def test_overrides_reach_nested_fields_and_presets():
    cfg = load_config("demo", ["train.budget=20steps", "model.layers=3", "optim.betas=[0.8,0.9]"])
    assert cfg.train.budget == "20steps"
    assert cfg.model.layers == 3 and cfg.model.hidden == load_config("demo").model.hidden
    assert tuple(cfg.optim.betas) == (0.8, 0.9)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.budjet=1h", "did you mean 'train.budget'"),
        ("trian.budget=1h", "did you mean 'train'"),
        # A field of another section (HF's trainer keeps the learning rate with training).
        ("train.lr=1e-3", r"unknown config key 'train\.lr' \(did you mean 'optim\.lr'\?\)$"),
        ("data.vocab_size=64", "did you mean 'data.prepare.vocab_size'"),
        # The run's own seed is a top-level field: not only data.prepare's was a home for it.
        ("train.seed=1", r"unknown config key 'train\.seed' \(did you mean 'seed' or 'data\.prepare\.seed'\?\)$"),
        ("train.batch_size=abc", "train.batch_size: expected an integer"),
        ("train.budget=abc", "budget 'abc' is not understood"),
        ("train.precision=fp8", "not one of"),
        ("model.heads=5", r"^model\.hidden \(\d+\) must be divisible by heads \(5\)"),
        # A section's own checks name the field with its section, as type errors do.
        ("model.norm=rms", r"^model\.norm: unknown norm 'rms' \(did you mean 'rmsnorm'\?\)"),
        ("model.hidden=-1", r"^model\.hidden must be a positive integer"),
        ("data.prepare.seq_len=3", r"^data\.prepare\.seq_len: 3 is too small"),
        ("data.prepare.min_chars=-1", r"^data\.prepare: min_chars, max_docs and min_frequency must be >= 0"),
        ("optim.lr=-1", r"^optim\.lr and optim\.muon_lr must be positive"),
        ("schedule.name=cosin", "did you mean 'cosine'"),
        ("techniques=[nope]", "unknown technique 'nope'"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda"),
        ("train.eval_batches=-1", "eval_batches must be >= 0"),
        # NaN passes every range check, so each of these used to fail only inside training.
        ("optim.lr=nan", "optim.lr: expected a finite number, got 'nan'"),
        ("model.init_std=nan", "model.init_std: expected a finite number"),
        ("train.clip_grad=inf", "train.clip_grad: expected a finite number"),
        ("data.prepare.tokenizer_sample_mb=nan", "tokenizer_sample_mb: expected a finite number"),
        ("optim.weight_decay=1e400", "optim.weight_decay: expected a finite number"),
        ("train.peak_tflops=-1", "train.peak_tflops must be >= 0"),
        ("train.max_nonfinite=0", r"train\.max_nonfinite must be >= 1"),
        ("schedule.final=-0.1", r"schedule\.final is a multiplier of the peak learning rate and must be in \[0, 1\]"),
        ("schedule.start=-1", r"schedule\.start is a multiplier"),
        # Above 1 the peak is not the peak: final=100 trained towards NaN without a word.
        ("schedule.final=100", r"must be in \[0, 1\], got 100.0 \(to train at a higher rate, raise optim\.lr\)"),
        ("schedule.start=1.5", r"schedule\.start is a multiplier .* got 1\.5"),
        # numpy's generators refuse a negative seed, torch one beyond 64 bits: tracebacks once
        # the run (or cramkit prepare) had started.
        ("seed=-1", r"^seed must be in \[0, 2\*\*63\), got -1$"),
        ("seed=99999999999999999999", r"^seed must be in \[0, 2\*\*63\), got 99999999999999999999$"),
        ("data.prepare.seed=-1", r"^data\.prepare\.seed must be in \[0, 2\*\*63\), got -1$"),
    ],
)
def test_bad_config_values_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.preset=3", "model.preset must be a preset name, got 3"),
        ("model.preset=[tiny]", r"model.preset must be a preset name, got \['tiny'\]"),
    ],
)
def test_ill_typed_preset_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


@pytest.mark.parametrize(
    "content, message",
    [
        (b'base = 3\n', "base must be a recipe name or path, got 3"),
        (b'base = ["demo"]\n', "base must be a recipe name or path"),
        (b'base = "demo"\n[model]\npreset = 3\n', "model.preset must be a preset name, got 3"),
        (b'base = "demo"\ntrain = 3\n', "train: expected a table of TrainConfig options"),
        (b"\xff\xfe\x00binary", r"bad\.toml line 1: not UTF-8 text"),
    ],
)
def test_ill_formed_recipe_file_is_a_clear_error(tmp_path, content, message):
    recipe = tmp_path / "bad.toml"
    recipe.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_config(str(recipe))


def _refused_naming_the_file_that_holds_it(tmp_path, content: bytes, message: str) -> None:
    """``content`` in a recipe based on demo, read directly and through a recipe based on it:
    the error must name that file, not the one the user ran, and match ``message``."""
    (tmp_path / "parent.toml").write_bytes(b'base = "demo"\n' + content)
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n[train]\nlog_every = 5\n')
    for recipe in ("parent.toml", "child.toml"):
        with pytest.raises(ConfigError, match=rf"^recipe '.*parent\.toml': {message}"):
            load_config(str(tmp_path / recipe))


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[train]\neval_every = "0.5"\n', r"train\.eval_every: expected a number, got '0\.5' \(write 0\.5\)$"),
        (b'[train]\ncompile = "yes"\n', r"train\.compile: expected true/false, got 'yes' \(write true\)$"),
        (b"[train]\nbatch_size = 32.0\n", r"train\.batch_size: expected an integer, got 32\.0 \(write 32\)$"),
        (b'[schedule]\npeak_at = "0.5"\n', r"schedule\.peak_at: '0\.5' is not a valid float \| None"),
        (b'techniques = "pld"\n', r"techniques: expected a list, got 'pld' \(write \[\"pld\"\]\)$"),
        (b'[optim]\nbetas = ["0.9", 0.98]\n', r"optim\.betas: \['0\.9', 0\.98\] is not a valid"),
        (b'techniques = ["pld"]\n[technique.pld]\nseed = "3"\n', r"technique\.pld\.seed: expected an integer"),
        (b"name = 2024\n", r"name: expected a string, got 2024"),
    ],
)
def test_a_recipe_files_values_must_have_their_fields_types(tmp_path, content, message):
    """TOML has types: the text parsing of key=value overrides ("0.5", "yes") let a quoted
    number or a misspelt boolean through, and read 32.0 as 32."""
    _refused_naming_the_file_that_holds_it(tmp_path, content, message)


@pytest.mark.parametrize("content, key", [(b"[train]\nbugdet = 10\n", r"train\.bugdet' \(did you mean 'train\.budget'\?\)"),
                                          (b'techniques = ["pld"]\n[technique.pld]\ngama = 0.1\n',
                                           r"technique\.pld\.gama' \(did you mean 'technique\.pld\.gamma'\?\)"),
                                          (b"hidden = 64\n", r"hidden' \(did you mean 'model\.hidden'\?\)"),
                                          # TOML's quoted key is one name: 'train.budget' looked like the field
                                          (b'"train.budget" = "2h"\n', r"train\.budget' \(a quoted key is one "
                                           r"name, dots and all: write train\.budget = \.\.\. without quotes, "
                                           r"or budget = \.\.\. under \[train\]\)")])
def test_an_unknown_key_names_the_recipe_file_that_holds_it(tmp_path, content, key):
    """As a value of the wrong type does: the key was reported without its file, which in a
    chain of bases the user had to hunt for."""
    _refused_naming_the_file_that_holds_it(tmp_path, content, f"unknown config key '{key}$")
    # An override's unknown key is the command line's, whatever the recipe holds.
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.bugdet'"):
        load_config("demo", ["train.bugdet=3"])


@pytest.mark.parametrize("content, message", [
    (b"[train]\nbatch_size = 0\n", r"train\.batch_size must be >= 1, got 0"),
    (b'[optim]\nname = "adamm"\n', r"optim\.name: unknown optimizer 'adamm' \(did you mean 'adamw'\?\)"),
    (b'techniques = ["pldd"]\n', r"techniques: unknown technique 'pldd' \(did you mean 'pld'\?\)"),
    (b"[model]\nhidden = 100\nheads = 3\n", r"model\.hidden \(100\) must be divisible by heads \(3\)"),
    (b"seed = -1\n", r"seed must be in \[0, 2\*\*63\)"),
    (b'name = "a/b"\n', r"name='a/b': a run name is one folder name"),
])
def test_a_value_out_of_range_names_the_recipe_file_that_holds_it(tmp_path, content, message):
    """Validation sees the merged config: its errors named the key only, and in a chain of bases
    the user had to hunt for the file that held it, as for an unknown key or a wrong type."""
    _refused_naming_the_file_that_holds_it(tmp_path, content, message)
    # A bad override of a value the file holds is the command line's error, with no file named.
    (tmp_path / "batch.toml").write_text('base = "demo"\n[train]\nbatch_size = 8\n')
    with pytest.raises(ConfigError, match=r"^train\.batch_size must be >= 1"):
        load_config(str(tmp_path / "batch.toml"), ["train.batch_size=0"])
    # Nor when the override is of an option the message names after the one the file holds.
    (tmp_path / "lr.toml").write_text('base = "demo"\n[optim]\nlr = 0.001\n')
    with pytest.raises(ConfigError, match=r"^optim\.lr and optim\.muon_lr must be positive"):
        load_config(str(tmp_path / "lr.toml"), ["optim.muon_lr=0"])
    # A shipped recipe's value is no file of the user's: an override that breaks it stays bare.
    with pytest.raises(ConfigError, match=r"^model\.hidden \(\d+\) must be divisible by heads \(3\)$"):
        load_config("demo", ["model.heads=3"])


def test_typed_files_still_take_an_int_for_a_float_and_overrides_still_parse_text(tmp_path):
    from cramkit.config import config_from_dict

    recipe = tmp_path / "ints.toml"
    recipe.write_text('base = "demo"\n[train]\neval_every = 1\nclip_grad = 2\n')
    cfg = load_config(str(recipe))
    assert cfg.train.eval_every == 1.0 and isinstance(cfg.train.eval_every, float) and cfg.train.clip_grad == 2.0
    cfg = load_config(str(recipe), ["train.eval_every=0.5", "train.compile=yes", "train.batch_size=32.0"])
    assert (cfg.train.eval_every, cfg.train.compile, cfg.train.batch_size) == (0.5, True, 32)
    # A typed dict, through the Python API, is checked as a recipe file is.
    with pytest.raises(ConfigError, match=r"^train\.batch_size: expected an integer, got '32' \(write 32\)$"):
        config_from_dict({"train": {"batch_size": "32"}})
    assert config_from_dict({"train": {"batch_size": "32"}}, strict=False).train.batch_size == 32


@pytest.mark.parametrize("name", recipe_names())
def test_every_shipped_recipes_config_json_loads_strictly(name):
    """What a run writes to config.json (lists for tuples, null for unset, each technique's
    options) is typed as strictly as a recipe file must be. (Resume, fine-tuning and export
    read it leniently all the same: earlier versions kept technique options as given.)"""
    from cramkit.config import config_from_dict
    from cramkit.techniques import TECHNIQUES

    for techniques in ([], *([t] for t in TECHNIQUES)):
        cfg = load_config(name, [f"techniques=[{','.join(techniques)}]"])
        saved = json.loads(json.dumps(cfg.resolved()))
        assert config_from_dict(saved).resolved() == saved


def test_config_that_is_not_a_table_is_a_clear_error():
    from cramkit.config import config_from_dict
    from cramkit.models.config import ModelConfig

    with pytest.raises(ConfigError, match="run config must be a table of options, got list"):
        config_from_dict([1, 2])  # e.g. a damaged config.json
    with pytest.raises(ConfigError, match="model: expected a table of options, got list"):
        ModelConfig.from_dict([1], path="model")  # e.g. a checkpoint's model_config


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError, match="unknown recipe 'crammed-bart'.*did you mean 'crammed-bert'"):
        load_config("crammed-bart")


@pytest.mark.parametrize(
    "text, kind, limit",
    [("90s", "seconds", 90), ("10min", "seconds", 600), ("2h", "seconds", 7200),
     ("500steps", "steps", 500), ("20Mtok", "tokens", 20e6), ("1e15flops", "flops", 1e15),
     ("1.5kstep", "steps", 1500)],
)
def test_budget_syntax(text, kind, limit):
    b = Budget.parse(text)
    assert (b.kind, b.limit) == (kind, limit)


@pytest.mark.parametrize("text", ["abc", "10", "10parsecs", "-5s", "0steps", "1e400steps"])
def test_bad_budget(text):
    with pytest.raises(ConfigError):
        Budget.parse(text)


def test_progress_and_exhaustion():
    b = Budget.parse("100steps")
    assert progress(b, Usage(steps=25)) == 0.25
    assert not exhausted(b, Usage(steps=99)) and exhausted(b, Usage(steps=100))
    assert progress(b, Usage(steps=500)) == 1.0


def test_clock_pauses():
    clock = Clock()
    clock.start()
    with clock.paused():
        t = clock.elapsed
        sum(range(200_000))
        assert clock.elapsed == t  # frozen while paused
    clock.stop()
    state = clock.state_dict()
    other = Clock()
    other.load_state_dict(state)
    assert other.elapsed == pytest.approx(clock.elapsed)


def test_schedule_config_leaves_each_schedule_its_own_shape():
    """schedule.peak_at / schedule.start unset: one-cycle peaks at 0.3 from 4 %, the budget
    triangle at 0.75 from 25 % (a shared default once made them the same schedule); set, they
    apply to either."""
    from cramkit.config import ScheduleConfig

    def curve(**fields):
        cfg = ScheduleConfig.from_dict(fields)
        return [lr_factor(cfg.name, p, **cfg.options()) for p in (0.0, 0.3, 0.75)]

    assert curve(name="one-cycle") == pytest.approx([0.04, 1.0, 1 - 0.45 / 0.7])
    assert curve(name="budget-triangle") == pytest.approx([0.25, 0.25 + 0.75 * 0.4, 1.0])
    assert curve(name="one-cycle", peak_at=0.75, start=0.25) == curve(name="budget-triangle")
    with pytest.raises(ConfigError, match="schedule.peak_at in"):
        ScheduleConfig.from_dict({"peak_at": 0.0})
    # config.json keeps the values the run used, so a later default cannot move a resumed run.
    resolved = ScheduleConfig.from_dict({"name": "one-cycle"}).resolved()
    assert (resolved["peak_at"], resolved["start"]) == (0.3, 0.04)
    assert ScheduleConfig.from_dict({"name": "cosine"}).resolved()["peak_at"] is None  # it has none



def test_a_recipe_switched_to_another_schedule_gets_that_schedule_s_shape():
    """crammed-bert wrote out the triangle's own peak_at/start, so schedule.name=one-cycle on it
    ran the budget triangle (peak at 75 % from 25 %) instead of the README's one-cycle."""
    for recipe in ("crammed-bert", "crammed-bert-lamb"):
        triangle = load_config(recipe, []).schedule.resolved()
        assert (triangle["name"], triangle["peak_at"], triangle["start"]) == ("budget-triangle", 0.75, 0.25)
        one_cycle = load_config(recipe, ["schedule.name=one-cycle"]).schedule.resolved()
        assert (one_cycle["peak_at"], one_cycle["start"]) == (0.3, 0.04)

def test_lr_schedules_are_pure_functions_of_progress():
    # Cramming's triangle: 25 % of peak at the start, the peak at 75 %, zero at the end.
    assert lr_factor("budget-triangle", 0.0) == pytest.approx(0.25)
    assert lr_factor("budget-triangle", 0.75) == pytest.approx(1.0)
    assert lr_factor("budget-triangle", 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 0.05, warmup=0.1) == pytest.approx(0.5)
    assert lr_factor("cosine", 0.55, warmup=0.1) == pytest.approx(0.5)
    assert lr_factor("linear", 1.0, warmup=0.1) == pytest.approx(0.0)
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("one-cycle", 0.3, peak_at=0.3) == pytest.approx(1.0)
    # Decay ends at `final` x peak, not at zero; half-way through the decay the cosine sits at
    # the midpoint of peak and final, and the linear decay a quarter in has gone a quarter down.
    assert lr_factor("cosine", 1.0, final=0.1) == pytest.approx(0.1)
    assert lr_factor("cosine", 0.55, warmup=0.1, final=0.1) == pytest.approx(0.55)
    assert lr_factor("linear", 0.325, warmup=0.1) == pytest.approx(0.75)
    assert lr_factor("linear", 0.55, warmup=0.1, final=0.2) == pytest.approx(0.6)
    assert lr_factor("linear", 1.0, warmup=0.1, final=0.2) == pytest.approx(0.2)
    for name in ("constant", "linear", "cosine", "one-cycle", "budget-triangle"):
        values = [lr_factor(name, p / 100) for p in range(101)]
        assert all(0.0 <= v <= 1.0 + 1e-9 and math.isfinite(v) for v in values)


def test_batch_ramp_grows_accumulation():
    steps = [accumulation_steps(p / 10, batch_size=256, micro_batch=32, ramp_fraction=0.6) for p in range(11)]
    assert steps[0] == 1 and steps[-1] == 8 and steps[6] == 8
    assert steps == sorted(steps)
    assert accumulation_steps(0.0, 256, 32, 0.0) == 8
    # Nearest whole number of micro-batches on the ramp 1 + 7 p / 0.9 (no ties at these points):
    # 1, 1.78, 2.56, 3.33, 4.11, 4.89, 5.67, 6.44, 7.22, 8, 8.
    steps = [accumulation_steps(p / 10, batch_size=256, micro_batch=32, ramp_fraction=0.9) for p in range(11)]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6, 7, 8, 8]


def test_the_batch_ramp_keeps_its_steps_with_another_micro_batch():
    """The ramp grows in steps of the run's first micro-batch (the unit): with a micro-batch that
    divides it, every step has the same batch; with the unit itself, accumulation_steps."""
    for p in (i / 20 for i in range(21)):
        assert ramp_accumulation(p, 256, 32, 32, 0.6) == accumulation_steps(p, 256, 32, 0.6)
        for micro in (1, 8, 16):
            assert ramp_accumulation(p, 256, micro, 32, 0.6) * micro == accumulation_steps(p, 256, 32, 0.6) * 32
        # After the ramp any micro-batch that divides the batch: the whole batch.
        if p >= 0.6:
            assert ramp_accumulation(p, 256, 64, 32, 0.6) == 4
    with pytest.raises(ValueError, match="batch of 32 sequences .* micro-batches of 64"):
        ramp_accumulation(0.0, 256, 64, 32, 0.6)


def test_the_batch_ramp_with_another_micro_batch_never_exceeds_the_batch():
    """A resume may change the batch and the micro-batch together (batch 16 in steps of 8, resumed
    as batch 12 with micro-batch 4): the unit need not divide the new batch, and the ramp then ends
    at the batch, never above it (no step of 16 sequences on a batch of 12), nor jumps down after."""
    for p in (i / 20 for i in range(21)):
        assert ramp_accumulation(p, 12, 4, 8, 0.6) * 4 <= 12
        assert ramp_accumulation(p, 8, 4, 16, 0.6) * 4 == 8  # a unit above the batch: the batch
    assert [ramp_accumulation(p, 12, 4, 8, 0.6) * 4 for p in (0.0, 0.2, 0.59, 0.6)] == [8, 8, 12, 12]


@pytest.mark.parametrize("parent", ["parent.toml", "common"])
def test_relative_base_is_found_beside_the_recipe_file(tmp_path, monkeypatch, parent):
    """A recipe's relative `base` path is the file beside it, from any working directory. Also
    without .toml: `base = "common"` was found there until _is_file_spec decided (from the
    working directory) that it was a shipped recipe's name: "unknown recipe 'common'"."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / parent).write_text('base = "demo"\n[train]\nbudget = "7steps"\n')
    (folder / "child.toml").write_text(f'base = "{parent}"\n[optim]\nlr = 0.002\n')
    monkeypatch.chdir(tmp_path)  # not the recipes folder
    cfg = load_config(str(folder / "child.toml"))
    assert cfg.train.budget == "7steps" and cfg.optim.lr == 0.002 and cfg.recipe == "child"
    (tmp_path / "cwd.toml").write_text('base = "demo"\n[train]\nbudget = "9steps"\n')
    (folder / "other.toml").write_text('base = "cwd.toml"\n')  # not beside it: the cwd path, as before
    assert load_config(str(folder / "other.toml")).train.budget == "9steps"


def test_a_recipe_may_base_on_the_shipped_recipe_of_its_own_name(tmp_path, monkeypatch):
    """Recipes are told apart by file, not by name: a user's demo.toml that bases on the shipped
    demo was refused as extending itself; a real loop is still an error, however it is spelt."""
    folder = tmp_path / "myrecipes"
    folder.mkdir()
    (folder / "demo.toml").write_text('base = "demo"\n[train]\nbudget = "7steps"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config("myrecipes/demo.toml")
    assert cfg.train.budget == "7steps" and cfg.model.vocab_size == load_config("demo").model.vocab_size
    (folder / "a.toml").write_text('base = "b.toml"\n')
    (folder / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"^recipe '.*a\.toml' extends itself: myrecipes/a\.toml -> "
                                          r".*b\.toml -> .*a\.toml$"):
        load_config("myrecipes/a.toml")
    (folder / "self.toml").write_text(f'base = "{folder / "self.toml"}"\n')  # itself, by another spelling
    with pytest.raises(ConfigError, match="self.toml' extends itself"):
        load_config("myrecipes/self.toml")


def test_a_later_layer_can_switch_a_recipes_technique_off(tmp_path):
    """A recipe's options for a technique go with it when a child recipe or the command line
    drops it from `techniques`; options for a technique that the same recipe file, or the
    command line, does not enable are still an error."""
    parent = tmp_path / "pld.toml"
    parent.write_text('base = "demo"\ntechniques = ["pld"]\n[technique.pld]\ntheta_bar = 0.3\n')
    assert load_config(str(parent)).technique == {"pld": {"theta_bar": 0.3}}
    cfg = load_config(str(parent), ["techniques=[]"])
    assert cfg.techniques == [] and cfg.technique == {}
    cfg = load_config(str(parent), ["techniques=seqwarmup"])  # a list written without brackets
    assert cfg.techniques == ["seqwarmup"] and cfg.technique == {}
    # Still enabled: the recipe's options stay and merge with the command line's.
    cfg = load_config(str(parent), ["techniques=[pld,seqwarmup]", "technique.pld.gamma=2"])
    assert cfg.technique == {"pld": {"theta_bar": 0.3, "gamma": 2}}
    with pytest.raises(ConfigError, match="options given for technique 'pld', which is not enabled"):
        load_config(str(parent), ["techniques=[]", "technique.pld.theta_bar=0.4"])

    (tmp_path / "off.toml").write_text('base = "pld.toml"\ntechniques = []\n')
    assert load_config(str(tmp_path / "off.toml")).technique == {}
    (tmp_path / "kept.toml").write_text('base = "pld.toml"\n[technique.pld]\ngamma = 2.0\n')
    assert load_config(str(tmp_path / "kept.toml")).technique == {"pld": {"theta_bar": 0.3, "gamma": 2.0}}
    (tmp_path / "forgot.toml").write_text('base = "pld.toml"\ntechniques = []\n[technique.pld]\ngamma = 2.0\n')
    with pytest.raises(ConfigError, match="options given for technique 'pld', which is not enabled"):
        load_config(str(tmp_path / "forgot.toml"))


def test_resume_can_switch_a_technique_off(tmp_path):
    """config.json records every enabled technique's options, so no resume could leave one out."""
    from cramkit.train.run import resume_config

    saved = load_config("demo", ["techniques=[pld]"]).to_dict()
    saved["technique"] = {"pld": {"theta_bar": 0.5, "gamma": 1.0}}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert resume_config(tmp_path, ["techniques=[]"]).technique == {}
    # Kept on, the options this table lacks take their defaults, and the resume says which.
    with pytest.warns(UserWarning, match=r"does not set technique\.pld\.seed=0, technique\.pld\.compile_blocks"):
        assert resume_config(tmp_path, []).technique == {"pld": {"theta_bar": 0.5, "gamma": 1.0}}


def test_resume_that_adds_a_technique_does_not_blame_an_earlier_cramkit(tmp_path):
    """A technique switched on at a resume takes its defaults as in a new run: its options are not
    settings that an earlier cramkit's config.json lacks, so no warning says they are."""
    import warnings

    from cramkit.train.run import resume_config

    (tmp_path / "config.json").write_text(json.dumps(load_config("demo", ["techniques=[stacking]"]).resolved()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = resume_config(tmp_path, ["techniques=[stacking,pld]", "technique.pld.theta_bar=0.3"])
    assert cfg.techniques == ["stacking", "pld"] and cfg.technique["pld"] == {"theta_bar": 0.3}


def test_a_list_split_by_the_shell_says_to_drop_the_spaces():
    # `techniques=[pld, seqwarmup]` reaches the program as two arguments.
    with pytest.raises(ConfigError, match=r"override 'seqwarmup\]' is not of the form key=value: write lists "
                                          r"without spaces \(techniques=\[pld,seqwarmup\]\) or quote them"):
        load_config("demo", ["techniques=[pld,", "seqwarmup]"])
    # Three pieces: the hint is the whole list; a list never closed is closed in the hint.
    with pytest.raises(ConfigError, match=r"\(techniques=\[pld,seqwarmup\]\) or quote"):
        load_config("demo", ["techniques=[pld,", "seqwarmup"])
    with pytest.raises(ConfigError, match=r"\(techniques=\[pld,seqwarmup,vcycle\]\) or quote"):
        load_config("demo", ["techniques=[pld,", "seqwarmup,", "vcycle]", "train.budget=2h"])
    with pytest.raises(ConfigError, match=r"^override 'oops\]' is not of the form key=value$"):
        load_config("demo", ["techniques=[pld]", "oops]"])
    with pytest.raises(ConfigError, match=r"^override 'oops' is not of the form key=value$"):
        load_config("demo", ["train.budget=2h", "oops"])
    # One piece, never closed: it was read as text, `techniques=[pld` as a technique named '[pld'.
    for args in (["techniques=[pld"], ["techniques=[pld,vcycle", "train.budget=2h"]):
        with pytest.raises(ConfigError, match=rf"^override '{re.escape(args[0])}': the list is not closed "
                                              rf"\(write {re.escape(args[0])}\]\)$"):
            load_config("demo", args)


def test_every_shipped_recipe_prepares_its_default_data_offline(tmp_path):
    """The recipes' default data is the embedded BBC corpus "so the recipe runs offline"; with
    min_frequency=2 it cannot fill 32768 WordPiece or 50257 BPE tokens, so `cramkit pretrain
    crammed-bert` (and bert-original, crammed-bert-lamb, gpt-small) failed at once."""
    from cramkit.data.dataset import TokenDataset
    from cramkit.data.prepare import cached_prepare

    configs = {}
    for name in recipe_names():
        cfg = load_config(name)
        if not cfg.data.dir:
            configs[json.dumps(cfg.data.prepare.to_dict(), sort_keys=True)] = cfg
    assert len(configs) >= 2  # WordPiece 32768 (BERT recipes) and BPE 50257 (GPT)
    for cfg in configs.values():
        data = TokenDataset.open(cached_prepare(cfg.data.prepare, tmp_path, progress=False))
        assert data.vocab_size == cfg.model.vocab_size
        assert data.num_sequences("train") > 0 and data.num_sequences("val") > 0


def test_a_path_in_a_run_name_is_refused_for_new_runs_only():
    """`name=../x` would put a new run outside out_dir; a run an older cramkit named `exp/run1`
    must still load (resume, fine-tune, export read its config.json)."""
    from cramkit.config import config_from_dict

    with pytest.raises(ConfigError, match="a run name is one folder name inside out_dir"):
        load_config("demo", ["name=exp/run1"])
    saved = load_config("demo").to_dict()
    assert config_from_dict({**saved, "name": "exp/run1"}).name == "exp/run1"


def test_a_missing_base_names_the_recipe_that_bases_on_it(tmp_path, monkeypatch):
    """In a chain of bases, "recipe file 'nosuch.toml' does not exist" named no file that said
    so, nor where it was looked for; a folder was said not to exist, and a base's `~` was not
    expanded as a path's is elsewhere."""
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "parent.toml").write_text('base = "nosuch.toml"\n')
    (folder / "child.toml").write_text('base = "parent.toml"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^recipe '.*recipes/parent\.toml': base: recipe file 'nosuch\.toml' does "
                                          rf"not exist \(neither beside it, in {re.escape(str(folder))}, nor in "
                                          rf"the working directory, {re.escape(str(tmp_path))}\)$"):
        load_config("recipes/child.toml")
    (folder / "named.toml").write_text('base = "demmo"\n')
    with pytest.raises(ConfigError, match=r"^recipe 'recipes/named\.toml': base: unknown recipe 'demmo' \(did you mean"):
        load_config("recipes/named.toml")
    (folder / "shipped.toml").write_text('base = "demo.toml"\n')
    with pytest.raises(ConfigError, match=r"named without \.toml: 'demo'"):
        load_config("recipes/shipped.toml")
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(ConfigError, match=r"^recipe file 'folder\.toml' is a folder, not a TOML file$"):
        load_config("folder.toml")
    monkeypatch.setenv("HOME", str(folder))
    (folder / "home.toml").write_text('base = "demo"\n[train]\nbudget = "7steps"\n')
    (tmp_path / "tilde.toml").write_text('base = "~/home.toml"\n')
    assert load_config("tilde.toml").train.budget == "7steps"


def test_a_shipped_name_is_the_shipped_recipe_whatever_files_are_around(tmp_path, monkeypatch):
    """A file called `demo` (a script, say) in the working directory or beside a recipe was read
    as TOML by `cramkit pretrain demo` and by `base = "demo"`; `./demo` still names the file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("#!/bin/sh\necho hello\n")
    assert load_config("demo").recipe == "demo"
    (tmp_path / "mine.toml").write_text('base = "demo"\n')
    assert load_config("mine.toml").model.vocab_size == load_config("demo").model.vocab_size
    with pytest.raises(ConfigError, match=r"^recipe '\./demo' is not valid TOML"):
        load_config("./demo")
    with pytest.raises(ConfigError, match=r"^recipe file '\./missing' does not exist$"):  # a path, not a name
        load_config("./missing")


def test_a_recipe_file_may_start_with_a_utf8_byte_order_mark(tmp_path):
    """As Notepad saves it: refused as "Invalid statement (at line 1, column 1)"."""
    recipe = tmp_path / "bom.toml"
    recipe.write_bytes(b'\xef\xbb\xbfbase = "demo"\r\n[train]\r\nbudget = "7steps"\r\n')
    assert load_config(str(recipe)).train.budget == "7steps"


@pytest.mark.parametrize("content, message", [
    (b'[model]\npreset = 3\n', r"model\.preset must be a preset name, got 3$"),
    (b'[model]\npreset = "tinyy"\n', r"unknown model preset 'tinyy' \(did you mean 'tiny'\?\)"),
])
def test_a_recipe_files_model_preset_error_names_the_file(tmp_path, content, message):
    """An ill-typed or unknown preset was the one value of a recipe file whose error named no file."""
    (tmp_path / "parent.toml").write_bytes(b'base = "demo"\n' + content)
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n')
    for recipe in ("parent.toml", "child.toml"):
        with pytest.raises(ConfigError, match=rf"^recipe '.*parent\.toml': {message}"):
            load_config(str(tmp_path / recipe))
    (tmp_path / "none.toml").write_text('base = "demo"\n[model]\npreset = ""\n')  # still: no preset
    assert load_config(str(tmp_path / "none.toml")).model.hidden != load_config("demo").model.hidden


def test_a_recipe_files_own_recipe_label_is_kept(tmp_path):
    """`recipe = "..."` (the first line of show-config's output) was replaced by the file's name
    without a word, while `recipe=` on the command line is kept; a base's label is not inherited."""
    (tmp_path / "parent.toml").write_text('base = "demo"\nrecipe = "labelled"\n')
    (tmp_path / "child.toml").write_text('base = "parent.toml"\n')
    assert load_config(str(tmp_path / "parent.toml")).recipe == "labelled"
    assert load_config(str(tmp_path / "child.toml")).recipe == "child"
    assert load_config(str(tmp_path / "parent.toml"), ["recipe=cli"]).recipe == "cli"
    # A run without name= is named after it: a path there would put the run outside out_dir.
    (tmp_path / "path.toml").write_text('base = "demo"\nrecipe = "../elsewhere"\n')
    with pytest.raises(ConfigError, match=r"^recipe='\.\./elsewhere': a run without name= is named after"):
        load_config(str(tmp_path / "path.toml"))
    assert load_config(str(tmp_path / "path.toml"), ["name=r"]).recipe == "../elsewhere"


def test_a_base_with_a_shipped_name_is_the_shipped_recipe_even_beside_a_file_of_that_name(tmp_path):
    """Looking beside the recipe first must not turn `base = "demo"` into a file called demo."""
    (tmp_path / "demo").write_text('[train]\nbudget = "9steps"\n')
    (tmp_path / "shipped.toml").write_text('base = "demo"\n')
    assert load_config(str(tmp_path / "shipped.toml")).train.budget == load_config("demo").train.budget
