"""Plugins: a technique and an optimizer kept outside the package, found through CRAMKIT_PLUGINS
or an entry point, and runs trained with them read by commands that do not load them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cramkit import plugins
from cramkit.cli import main
from cramkit.errors import ConfigError
from cramkit.optim import OPTIMIZERS
from cramkit.schedules import LR_SCHEDULES
from cramkit.techniques import TECHNIQUES

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A real technique (it halves the learning rate for a share of the budget, and counts the steps
# it did so, which a resume must restore) and an optimizer, as a researcher would write them.
PLUGIN = textwrap.dedent('''
    import dataclasses

    import torch

    from cramkit.configbase import Config, field
    from cramkit.optim import register_optimizer
    from cramkit.techniques import ContractCases, Technique, register


    @dataclasses.dataclass
    class SlowStartOptions(Config):
        """Options of slowstart."""

        fraction: float = field(0.5, help="share of the budget trained at half the learning rate")


    @register
    class SlowStart(Technique):
        """Half the learning rate for the first ``fraction`` of the budget."""

        name = "slowstart"
        Options = SlowStartOptions

        def __init__(self, options):
            super().__init__(options)
            self.slow_steps = 0

        @classmethod
        def contract_cases(cls):
            return ContractCases(acting=("technique.slowstart.fraction=0.5",),
                                 disabled=("technique.slowstart.fraction=0",),
                                 misapplied=("model.layers=7",), changes_flops=False)

        def on_model(self, model):
            from cramkit.errors import ConfigError

            if len(model.layers) == 7:
                raise ConfigError("slowstart: seven layers are unlucky")
            return model

        def on_step_start(self, state):
            if state.progress < self.options.fraction:
                state.lr_scale *= 0.5
                self.slow_steps += 1

        def state_dict(self):
            return {"slow_steps": self.slow_steps}

        def load_state_dict(self, state):
            self.slow_steps = state.get("slow_steps", 0)


    @register_optimizer("plainsgd")
    def plainsgd(groups, cfg, device):
        return torch.optim.SGD(groups, lr=cfg.lr)
''')


@pytest.fixture
def plugin_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "slowstart_plugin.py"
    path.write_text(PLUGIN)
    return path


@pytest.fixture
def clean_registries(monkeypatch):
    """What a test's plugins register is gone after it: other tests list the shipped names."""
    saved = [(table, dict(table)) for table in (TECHNIQUES, OPTIMIZERS, LR_SCHEDULES)]
    monkeypatch.setattr(plugins, "_loaded", {})
    yield
    for table, content in saved:
        table.clear()
        table.update(content)


def _cramkit(*args: str, plugin: Path | None, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != plugins.ENV}
    env["PYTHONPATH"] = SRC
    if plugin is not None:
        env[plugins.ENV] = str(plugin)
    return subprocess.run([sys.executable, "-m", "cramkit", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_a_plugin_file_adds_a_technique_and_an_optimizer_to_every_command(plugin_file, tiny_mlm_data, tmp_path,
                                                                         monkeypatch, capsys, clean_registries):
    run = ["data.dir=" + str(tiny_mlm_data), f"out_dir={tmp_path}", "name=run", "model.preset=tiny",
           "model.vocab_size=512", "model.max_positions=64", "train.batch_size=8", "train.micro_batch=4",
           "train.eval_every=0", "train.eval_batches=2", "train.progress_bar=false", "train.tensorboard=false", "train.plots=false",
           "train.device=cpu", "finetune_demo=false", "techniques=[slowstart]", "technique.slowstart.fraction=0.5",
           "optim.name=plainsgd"]
    monkeypatch.setenv(plugins.ENV, str(plugin_file))
    assert main(["show-config", "demo", *run]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["name"] == "plainsgd"
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "technique.slowstart.fraction" in capsys.readouterr().out
    monkeypatch.delenv(plugins.ENV)
    trained = _cramkit("pretrain", "demo", *run, "train.budget=4steps", "train.checkpoint_every=0.5",
                       plugin=plugin_file, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    # Its state went into the checkpoints like a shipped technique's.
    import torch

    from cramkit.train.checkpoint import latest_checkpoint

    state = torch.load(latest_checkpoint(tmp_path / "run") / "state.pt", weights_only=True)
    assert state["techniques"] == {"slowstart": {"slow_steps": 2}}
    # Without the plugin, export and fine-tuning need only the model; a resume, which needs
    # both, says where a plugin's names come from.
    TECHNIQUES.pop("slowstart"), OPTIMIZERS.pop("plainsgd")  # as in a process that never loaded it
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    resumed = _cramkit("pretrain", "--resume", str(tmp_path / "run"), "train.budget=6steps", plugin=None, cwd=tmp_path)
    assert resumed.returncode == 2 and "Traceback" not in resumed.stderr
    # The run recorded the file, which is named with how to load it (it is not run unasked).
    assert (f"unknown optimizer 'plainsgd' (this run was trained with plugin {plugin_file.resolve()}, which is not "
            f"loaded: set {plugins.ENV}={plugin_file.resolve()})") in resumed.stderr
    resumed = _cramkit("pretrain", "--resume", str(tmp_path / "run"), "train.budget=6steps", plugin=plugin_file,
                       cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    state = torch.load(latest_checkpoint(tmp_path / "run") / "state.pt", weights_only=True)
    # Restored (else 0): steps 5 and 6 lie past half of the larger budget, and add none.
    assert state["techniques"] == {"slowstart": {"slow_steps": 2}}


def test_plugins_that_cannot_be_found_are_one_line_errors(tmp_path, monkeypatch, capsys, clean_registries):
    monkeypatch.setenv(plugins.ENV, "no_such_plugin_module")
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err == (f"error: {plugins.ENV}: no module named 'no_such_plugin_module' "
                                       "(a module on the Python path, or a .py file)\n")
    monkeypatch.setenv(plugins.ENV, str(tmp_path / "missing.py"))
    assert main(["recipes"]) == 2
    assert "plugin file" in capsys.readouterr().err
    # importlib took ".x" for a relative import: a TypeError traceback.
    monkeypatch.setenv(plugins.ENV, ".x")
    assert main(["recipes"]) == 2
    assert capsys.readouterr().err == (f"error: {plugins.ENV}: '.x' is not a module name (dotted Python "
                                       "identifiers) nor a .py file\n")
    # A plugin's own missing import is its author's to see, with the traceback.
    (tmp_path / "broken.py").write_text("import no_such_dependency_of_the_plugin\n")
    monkeypatch.setenv(plugins.ENV, str(tmp_path / "broken.py"))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_plugin"):
        plugins.load_plugins()


def test_installed_packages_plug_in_through_entry_points(tmp_path, monkeypatch, clean_registries):
    from importlib.metadata import EntryPoint

    (tmp_path / "mylab_schedule.py").write_text(textwrap.dedent('''
        from cramkit.schedules import register_lr

        @register_lr("halfway")
        def halfway(p, warmup=0.0, **_):
            return 1.0 if p < 0.5 else 0.5
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.ENV, raising=False)
    entry = EntryPoint(name="halfway", value="mylab_schedule", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points",
                        lambda group: [entry] if group == plugins.ENTRY_POINT_GROUP else [])
    assert plugins.load_plugins() == ["halfway=mylab_schedule"]
    assert "halfway" in LR_SCHEDULES
    assert plugins.load_plugins() == ["halfway=mylab_schedule"]  # once per process
    from cramkit.config import load_config

    assert load_config("demo", ["schedule.name=halfway"]).schedule.name == "halfway"
    # An entry point's own missing import is its author's traceback, as for CRAMKIT_PLUGINS.
    (tmp_path / "mylab_broken.py").write_text("import no_such_dependency_of_the_plugin\n")
    broken = EntryPoint(name="broken", value="mylab_broken", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_of_the_plugin"):
        plugins.load_plugins()
    gone = EntryPoint(name="gone", value="mylab_uninstalled", group=plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", lambda group: [gone])
    with pytest.raises(ConfigError, match="plugin entry point 'gone=mylab_uninstalled'.*reinstall"):
        plugins.load_plugins()


def test_every_registry_says_unknown_name_so_that_export_can_pass_a_plugins_over():
    """A run trained with a plugin's schedule could not be exported without the plugin: the
    schedule's unknown name was a plain ConfigError, which the model-only reading never saw."""
    from cramkit.config import config_from_dict
    from cramkit.errors import UnknownName

    for section in ({"schedule": {"name": "halfway"}}, {"optim": {"name": "plainsgd"}},
                    {"techniques": ["slowstart"]}):
        with pytest.raises(UnknownName, match=f"a plugin's is found once {plugins.ENV} names its module"):
            config_from_dict(section)


def test_a_plugin_cannot_take_a_shipped_name(clean_registries):
    from cramkit.optim import register_optimizer

    with pytest.raises(TypeError, match=r"optimizer 'adamw' is registered twice \(cramkit\.optim\.optimizers"):
        register_optimizer("adamw")(lambda groups, cfg, device: None)
    assert OPTIMIZERS["adamw"].__module__ == "cramkit.optim.optimizers"


# A model component from a plugin: every command that builds the run's model needs it.
INIT_PLUGIN = textwrap.dedent('''
    import torch

    from cramkit.models.registry import INITS


    @INITS.register("halfinit")
    def halfinit(model):
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.01)
''')


@pytest.fixture
def init_plugin(tmp_path, monkeypatch, clean_registries):
    """``halfinit_plugin.py`` on the Python path; its module and registration go after the test."""
    from cramkit.models.registry import INITS

    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "halfinit_plugin.py").write_text(INIT_PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv(plugins.ENV, raising=False)
    saved = dict(INITS._items)
    yield folder / "halfinit_plugin.py"
    _forget_plugins(monkeypatch)
    INITS._items.clear()
    INITS._items.update(saved)


def _forget_plugins(monkeypatch) -> None:
    """As a new process without the plugin: neither imported nor registered."""
    from cramkit.models.registry import INITS

    INITS._items.pop("halfinit", None)
    for name in [n for n in sys.modules if n.endswith("halfinit_plugin")]:
        del sys.modules[name]
    monkeypatch.setattr(plugins, "_loaded", {})


def _init_run(tiny_mlm_data, tmp_path) -> list[str]:
    return ["demo", f"data.dir={tiny_mlm_data}", f"out_dir={tmp_path}", "name=run", "model.preset=tiny",
            "model.vocab_size=512", "model.max_positions=64", "train.batch_size=8", "train.micro_batch=4",
            "train.eval_every=0", "train.eval_batches=2", "train.progress_bar=false", "train.tensorboard=false",
            "train.plots=false", "train.device=cpu", "finetune_demo=false", "model.init=halfinit",
            "train.budget=2steps"]


def test_a_run_records_its_plugin_modules_and_later_commands_import_them(init_plugin, tiny_mlm_data, tmp_path,
                                                                       monkeypatch, capsys):
    """A run trained with a plugin's init scheme could not be exported, fine-tuned or resumed
    without CRAMKIT_PLUGINS, and the error proposed a shipped name: "unknown init scheme
    'halfinit' (did you mean 'normal'?)"."""
    run = tmp_path / "run"
    monkeypatch.setenv(plugins.ENV, "halfinit_plugin")
    assert main(["pretrain", *_init_run(tiny_mlm_data, tmp_path)]) == 0
    assert json.loads((run / "environment.json").read_text())["plugins"] == ["halfinit_plugin"]
    monkeypatch.delenv(plugins.ENV)
    _forget_plugins(monkeypatch)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    _forget_plugins(monkeypatch)
    assert main(["pretrain", "--resume", str(run), "train.budget=3steps"]) == 0
    capsys.readouterr()
    # Uninstalled since: one line that names the plugin and what to do.
    init_plugin.rename(init_plugin.with_suffix(".gone"))
    _forget_plugins(monkeypatch)
    assert main(["export", str(run), "--out", str(tmp_path / "export2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown init scheme 'halfinit' (this run was trained with plugin " \
        "halfinit_plugin, which cannot be imported here: no module named 'halfinit_plugin'" in err, err
    assert "did you mean" not in err


def test_a_run_trained_with_a_plugin_file_says_how_to_load_it(init_plugin, tiny_mlm_data, tmp_path, monkeypatch,
                                                              capsys):
    """A plugin file is code that a run directory only names: it is not run unasked, and each
    command that needs it says how to load it."""
    run = tmp_path / "run"
    monkeypatch.chdir(init_plugin.parent)
    monkeypatch.setenv(plugins.ENV, init_plugin.name)  # relative: recorded as the file it is
    assert main(["pretrain", *_init_run(tiny_mlm_data, tmp_path)]) == 0
    assert json.loads((run / "environment.json").read_text())["plugins"] == [str(init_plugin.resolve())]
    monkeypatch.delenv(plugins.ENV)
    _forget_plugins(monkeypatch)
    capsys.readouterr()
    hint = (f"unknown init scheme 'halfinit' (this run was trained with plugin {init_plugin.resolve()}, which "
            f"is not loaded: set {plugins.ENV}={init_plugin.resolve()})")
    for command in (["export", str(run), "--out", str(tmp_path / "export")],
                    ["finetune", str(run), "--task", "bbc"],
                    ["pretrain", "--resume", str(run), "train.budget=3steps"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and hint in err, (command, err)
    # Named by its absolute path now, the file is the one the run recorded (not imported twice).
    monkeypatch.setenv(plugins.ENV, str(init_plugin.resolve()))
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0


def test_a_module_inside_the_run_directory_is_not_imported(tmp_path, monkeypatch, clean_registries):
    """A run directory from someone else, read with it on the Python path (``python -m cramkit``
    run from inside it), must not run a module that came with it by recording its name."""
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "ran"
    (run / "shipped_with_run.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (run / "environment.json").write_text(json.dumps({"plugins": ["shipped_with_run"]}))
    monkeypatch.syspath_prepend(str(run))
    monkeypatch.chdir(run)
    with plugins.run_plugins(run):
        hint = plugins.unknown_hint("halfinit", ["normal"])
    assert not marker.exists() and "shipped_with_run" not in sys.modules
    assert "shipped_with_run, which would be imported from the run directory itself" in hint, hint
    assert f"set {plugins.ENV}=shipped_with_run" in hint


def test_a_recorded_module_loaded_now_as_its_file_is_not_imported_again(init_plugin, tmp_path, monkeypatch):
    """A run trained with CRAMKIT_PLUGINS=halfinit_plugin, read with the same plugin named as
    its file: importing the module too ran its registrations twice (a TypeError traceback)."""
    from cramkit.models.registry import INITS

    run = tmp_path / "run"
    run.mkdir()
    (run / "environment.json").write_text(json.dumps({"plugins": ["halfinit_plugin"]}))
    monkeypatch.setenv(plugins.ENV, str(init_plugin))
    plugins.load_plugins()
    with plugins.run_plugins(run):
        assert "halfinit" in INITS
    assert "halfinit_plugin" not in sys.modules


def test_a_damaged_record_of_plugins_is_no_traceback(tmp_path, clean_registries):
    """environment.json naming no module (".x", "a b"): reading the run names it as missing."""
    (tmp_path / "environment.json").write_text(json.dumps({"plugins": [".x", "a b"]}))
    with plugins.run_plugins(tmp_path):
        hint = plugins.unknown_hint("halfinit", ["normal"])
    assert ".x, which cannot be imported here" in hint and "a b, which cannot be imported here" in hint, hint


@pytest.mark.parametrize("env", [{"resumes": 3}, {"plugins": 5}, {"resumes": [{"plugins": "x.py"}]}, [1, 2]])
def test_a_record_of_plugins_of_another_shape_records_none(tmp_path, env):
    """A damaged environment.json is read as recording no plugins (a TypeError traceback for a
    'resumes' or 'plugins' that is not a list, from every command that reads the run)."""
    (tmp_path / "environment.json").write_text(json.dumps(env))
    assert plugins.run_plugins_recorded(tmp_path) == []
