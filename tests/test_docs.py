"""The commands the README and docs/ show resolve to valid configs (a user copies them)."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cramkit.config import load_config
from cramkit.train.cli import _split_overrides

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[str]:
    """``cramkit pretrain|show-config RECIPE ...`` lines inside the fenced code blocks of ``path``
    (torchrun's ``-m cramkit.cli pretrain`` too, continuation lines joined), without --resume."""
    text = path.read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:^cramkit|-m cramkit\.cli) (pretrain|show-config) (.*)$", line)
            if m and "--resume" not in m.group(2):
                out.append(m.group(2))
    return out


CASES = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in _commands(path)]


def test_the_docs_show_pretrain_commands():
    assert any("rezero" in cmd for _, cmd in CASES)  # the parser finds the README's examples
    assert any(where.startswith("docs/") for where, _ in CASES)


@pytest.mark.parametrize(("where", "command"), CASES)
def test_documented_pretrain_commands_resolve(where, command):
    args = shlex.split(command)
    # $NODE_RANK and friends are shell variables in the torchrun example; they are not overrides.
    args = [a for a in args if "$" not in a]
    recipe, overrides = _split_overrides(argparse.Namespace(recipe=args[0], overrides=args[1:]))
    load_config(recipe, overrides)  # raises ConfigError for an invalid combination


def test_the_documented_plugin_runs_the_documented_command(tiny_mlm_data, tmp_path):
    """docs/techniques.md names plugins/freeze.py in its commands: the file it shows must be one a
    user can save and run them with."""
    text = (ROOT / "docs" / "techniques.md").read_text()
    code = re.search(r"```python\n(# plugins/freeze\.py.*?)```", text, flags=re.S)
    assert code, "docs/techniques.md shows no plugins/freeze.py"
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "freeze.py").write_text(code.group(1))
    command = re.search(r"^CRAMKIT_PLUGINS=(\S+) cramkit (pretrain .*)$", text, flags=re.M)
    assert command and command.group(1) == "plugins/freeze.py"
    shrink = [f"data.dir={tiny_mlm_data}", "model.vocab_size=512", "model.max_positions=64", "budget=4steps",
              "finetune_demo=false", "name=run", "train.eval_every=0", "train.eval_batches=2",
              "train.tensorboard=false", "train.plots=false", "train.progress_bar=false", "train.device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CRAMKIT_PLUGINS": command.group(1)}
    done = subprocess.run([sys.executable, "-m", "cramkit", *shlex.split(command.group(2)), *shrink], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "runs" / "run" / "config.json").read_text())
    assert config["techniques"] == ["freeze"] and config["technique"]["freeze"]["fraction"] == 0.2


def _other_commands(path: Path) -> list[str]:
    """``cramkit prepare|finetune|evaluate|predict|export|report|bench ...`` lines in the fenced code
    blocks of ``path``, from the subcommand on."""
    out = []
    subcommand = r"cramkit ((?:prepare|finetune|evaluate|predict|export|report|bench) .*)"
    for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|\s)" + subcommand + "$", line.split(" #", 1)[0].strip())
            if m:
                out.append(m.group(1))
    return out


def _inline_commands(path: Path) -> list[str]:
    """``cramkit SUBCOMMAND ...`` in the inline code of ``path``'s prose: often fragments
    (``cramkit prepare ... --tokenizer OLD/tokenizer.json``), so only their flags are checked."""
    prose = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [" ".join(m.split()) for m in re.findall(r"(?<!`)`cramkit ([a-z-]+ [^`]*)`", prose)]


def _flags(parser: argparse.ArgumentParser, command: str) -> tuple[set[str], set[str]]:
    """The flags ``command`` names and those its subcommand's parser knows (argparse also takes a
    flag's prefix, --text-col: the docs must spell a flag whole)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command.split()[0]]
    known = {s for action in sub._actions for s in action.option_strings}
    return {t.split("=")[0] for t in shlex.split(command) if t.startswith("--")}, known


def test_flags_in_the_docs_inline_commands_are_real():
    from cramkit.cli import build_parser

    parser = build_parser()
    commands = [(path.name, cmd) for path in DOCS for cmd in _inline_commands(path)]
    assert any(cmd.startswith("bench ") for _, cmd in commands)
    for where, cmd in commands:
        named, known = _flags(parser, cmd)
        assert named <= known, f"{where}: `cramkit {cmd}` names {sorted(named - known)}"


OTHER_CASES = [(path.relative_to(ROOT).as_posix(), cmd) for path in DOCS for cmd in _other_commands(path)]


def test_the_docs_show_the_other_commands():
    assert {cmd.split()[0] for _, cmd in OTHER_CASES} >= {"prepare", "finetune", "evaluate", "predict", "export",
                                                          "report"}


@pytest.mark.parametrize(("where", "command"), OTHER_CASES)
def test_documented_commands_use_real_flags_and_options(where, command):
    """Every flag a documented command names is one its parser knows, and its key=value options
    are real fine-tuning / preparation options (a user copies them)."""
    from cramkit.cli import build_parser
    from cramkit.data.cli import config_from_args
    from cramkit.eval.cli import _finetune_config

    parser = build_parser()
    args = parser.parse_args(shlex.split(command))  # SystemExit(2) on an unknown flag
    named, known = _flags(parser, command)
    assert named <= known
    if args.command in ("finetune", "evaluate"):
        _finetune_config(args.overrides)
    elif args.command == "prepare":
        config_from_args(args)
