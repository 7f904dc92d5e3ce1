"""Enabling techniques from a recipe or the command line: names, options, conflicts, order."""

from __future__ import annotations

import pytest
from technique_helpers import tiny_config

from cramkit.config import load_config
from cramkit.errors import ConfigError
from cramkit.techniques import TECHNIQUES, build_techniques


def test_command_line_enables_techniques_with_options(tmp_path):
    cfg = load_config("demo", ["techniques=[pld,seqwarmup]", "technique.pld.theta_bar=0.4",
                               "technique.seqwarmup.fraction=0.2"])
    built = build_techniques(cfg.techniques, cfg.technique)
    assert [t.name for t in built] == ["seqwarmup", "pld"]  # hook order, not list order
    assert built[1].options.theta_bar == 0.4 and built[0].options.fraction == 0.2


def test_unknown_names_and_options_are_errors_with_hints():
    with pytest.raises(ConfigError, match="did you mean 'pld'"):
        load_config("demo", ["techniques=[pdl]"])
    with pytest.raises(ConfigError, match="did you mean 'theta_bar'"):
        load_config("demo", ["techniques=[pld]", "technique.pld.theta_bra=0.4"])
    with pytest.raises(ConfigError, match="not enabled"):
        load_config("demo", ["technique.pld.theta_bar=0.4"])


def test_declared_conflicts_are_refused():
    assert "vcycle" in TECHNIQUES["stacking"].conflicts
    with pytest.raises(ConfigError, match="cannot be combined"):
        load_config("demo", ["techniques=[stacking,vcycle]"])


def test_every_technique_documents_its_options():
    for cls in TECHNIQUES.values():
        assert cls.__doc__ and cls.Options.__doc__
        for f in cls.Options.__dataclass_fields__.values():
            assert f.metadata.get("help"), f"{cls.name}.{f.name} has no help text"


def test_techniques_compose_in_one_run(tiny_mlm_data, tmp_path):
    from cramkit.train.run import pretrain

    cfg = tiny_config(tiny_mlm_data, tmp_path, "train.budget=8steps", "model.layers=4",
                      "techniques=[stacking,pld,seqwarmup]", "technique.stacking.doublings=1",
                      "technique.stacking.at=[0.5]", "technique.pld.theta_bar=0.5",
                      "technique.pld.gamma=5", "technique.seqwarmup.start=8")
    summary = pretrain(cfg, say=lambda *_: None)
    assert summary["steps"] == 8
